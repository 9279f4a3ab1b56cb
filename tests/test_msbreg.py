"""msbreg.py, our reconstruction of MSBReg: each force against a naive loop over images and views and its closed
forms, the three readings of --centroid by hand, the default bit-identical to the code before the flag, M = 2 with
zero weights is BYOL, exact resume with M = 4, end to end with linear_eval.py, bad input."""
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import byol
import common
from support import runs
import msbreg
from conftest import TinyEncoder, run_script
from test_cli import TINY, check_ok, check_one_line_error
from test_training import tiny_argv, tiny_byol


def unit(v):
    return v / v.norm()


# --- (i) centroid ----------------------------------------------------------------------------------------------------
def naive_centroid_loss(p, t, own_view):
    """(2 / M) sum over views i and images j of ||p_ij/|p_ij| - c_ij||^2 / B, written as loops; c_ij is the unit
    centroid of the unit targets of image j's views, view i's own target included only when `own_view`."""
    m, b, _ = p.shape
    total = 0.0
    for i in range(m):
        for j in range(b):
            centroid = unit(sum(unit(t[k, j]) for k in range(m) if own_view or k != i))
            total += float((unit(p[i, j]) - centroid).norm()) ** 2 / b
    return 2 / m * total


def test_centroid_loss_matches_naive_loop():
    torch.manual_seed(0)
    p, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert msbreg.centroid_loss(p, t).item() == pytest.approx(naive_centroid_loss(p, t, own_view=False), rel=1e-5)


def test_centroid_loss_closed_forms():
    torch.manual_seed(1)
    p, t = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    # M = 2: BYOL's symmetric loss, view 1 predicting view 2's target and vice versa (byol.loss_terms)
    symmetric = byol.byol_loss(p[0], t[1]) + byol.byol_loss(p[1], t[0])
    assert msbreg.centroid_loss(p, t).item() == pytest.approx(symmetric.item(), rel=1e-6)
    # every prediction on its centroid: 0; every prediction opposite to it: 4 per view, times 2 / M * M = 8
    t = torch.randn(1, 6, 8).expand(4, 6, 8) * torch.rand(4, 6, 1).add(0.5)   # all views' targets parallel
    assert msbreg.centroid_loss(t * 3, t).item() == pytest.approx(0.0, abs=1e-6)
    assert msbreg.centroid_loss(-t, t).item() == pytest.approx(8.0, rel=1e-6)


def test_centroid_gradient_reaches_predictions_only():
    p, t = torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 4, 5, requires_grad=True)
    msbreg.centroid_loss(p, t).backward()
    assert p.grad.abs().sum() > 0 and t.grad is None   # the target is a stop-gradient, as in BYOL


# --- (i) centroid: the three readings of --centroid -----------------------------------------------------------------
READINGS = ("leave-one-out", "centroid-to-centroid", "all-views")


def reading(name):
    return msbreg.CENTROID_READINGS[name][0]


def test_the_three_readings_on_two_orthogonal_views():
    """Issue 19's case: M = 2, B = 1, t_1 = e_1, t_2 = e_2, each prediction its own view's target. Leave-one-out:
    each view is ||e_1 - e_2||^2 = 2 from the other's target, (2 / 2) (2 + 2) = 4. Caption: the two centroids are
    both (e_1 + e_2) / sqrt 2: 0. Abstract: each view is ||e_1 - (e_1 + e_2) / sqrt 2||^2 = 2 - sqrt 2 = 0.586 from
    the centroid; on the file's scale (2 / M summed over the views) the total is 2 (2 - sqrt 2) = 1.172."""
    t = torch.eye(3)[:2].reshape(2, 1, 3)                                  # (M, B, D): t_1 = e_1, t_2 = e_2
    assert reading("leave-one-out")(t.clone(), t).item() == pytest.approx(4.0, abs=1e-6)
    assert reading("centroid-to-centroid")(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    abstract = reading("all-views")(t.clone(), t).item()
    assert abstract == pytest.approx(2 * (2 - math.sqrt(2)), abs=1e-6)
    assert abstract / 2 == pytest.approx(0.586, abs=5e-4)                 # the issue's number: the mean per view
    # every prediction opposite its own view's target: the caption's centroids are opposite too
    assert reading("centroid-to-centroid")(-t, t).item() == pytest.approx(8.0, abs=1e-6)


@pytest.mark.parametrize("m", [3, 4])
def test_the_three_readings_on_orthonormal_views(m):
    """t_k = e_k, p_k = 3 e_k for M views. Leave-one-out: e_m is orthogonal to its centroid, 2 per view, 4 in all
    for any M. Caption: the same centroid on both sides, 0. Abstract: e_m . (sum_k e_k) / sqrt M = 1 / sqrt M,
    2 - 2 / sqrt M per view, twice that in all (2 at M = 4)."""
    t = torch.eye(m + 1)[:m].reshape(m, 1, m + 1)
    assert reading("leave-one-out")(3 * t, t).item() == pytest.approx(4.0, abs=1e-6)
    assert reading("centroid-to-centroid")(3 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert reading("all-views")(3 * t, t).item() == pytest.approx(2 * (2 - 2 / math.sqrt(m)), abs=1e-6)


def test_centroid_to_centroid_matches_naive_loop():
    torch.manual_seed(6)
    m, b, d = 3, 4, 5
    p, t = torch.randn(m, b, d), torch.randn(m, b, d)
    total = 0.0
    for j in range(b):
        online = unit(sum(unit(p[i, j]) for i in range(m)))                 # the centroid of the predictions
        target = unit(sum(unit(t[i, j]) for i in range(m)))                 # the centroid of the targets
        total += float((online - target).norm()) ** 2 / b
    assert reading("centroid-to-centroid")(p, t).item() == pytest.approx(2 * total, rel=1e-5)
    # only the centroids are compared: the views may trade predictions at no cost
    assert reading("centroid-to-centroid")(p.flip(0), t).item() == pytest.approx(2 * total, rel=1e-5)
    # or disagree: t_1 = t_2 = e_1, p_1, p_2 = (e_1 +- e_2) / sqrt 2, whose centroid is e_1: 0 for the caption,
    # 2 - 2 / sqrt 2 per view for the other two readings (each prediction is 45 degrees from the target)
    e = torch.eye(2)
    t, p = torch.stack([e[0], e[0]]).reshape(2, 1, 2), torch.stack([e[0] + e[1], e[0] - e[1]]).reshape(2, 1, 2)
    assert reading("centroid-to-centroid")(p, t).item() == pytest.approx(0.0, abs=1e-6)
    assert reading("leave-one-out")(p, t).item() == pytest.approx(2 * (2 - math.sqrt(2)), abs=1e-6)
    assert reading("all-views")(p, t).item() == pytest.approx(2 * (2 - math.sqrt(2)), abs=1e-6)


def test_all_views_centroid_matches_naive_loop():
    torch.manual_seed(7)
    m, b, d = 3, 4, 5
    p, t = torch.randn(m, b, d), torch.randn(m, b, d)
    assert reading("all-views")(p, t).item() == pytest.approx(naive_centroid_loss(p, t, own_view=True), rel=1e-5)
    # every prediction on its image's centroid: 0
    c = torch.stack([unit(sum(unit(t[k, j]) for k in range(m))) for j in range(b)])   # (B, D)
    assert reading("all-views")(c.expand(m, b, d) * 2, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", READINGS)
def test_every_reading_moves_the_predictions_only(name):
    torch.manual_seed(8)
    p, t = torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 4, 5, requires_grad=True)
    reading(name)(p, t).backward()
    assert t.grad is None                                                  # BYOL's stop-gradient on the target
    assert (p.grad.flatten(1).abs().sum(dim=1) > 0).all()                 # every view's prediction is pulled


def centroid_loss_before_issue_19(p, t):
    """The body of msbreg.centroid_loss before --centroid (commit efbc733), verbatim: the default must not change."""
    m = p.shape[0]
    with common.fp32(p):
        p, t = F.normalize(p.float(), dim=-1), F.normalize(t.detach().float(), dim=-1)
        others = 1 - torch.eye(m, device=t.device)                                # (M, M): k != m
        c = F.normalize(torch.einsum("mk,kbd->mbd", others, t), dim=-1)          # (M, B, D) leave-one-out centroids
        return 2 / m * (2 - 2 * (p * c).sum(dim=-1)).mean(dim=1).sum()


def test_default_reading_is_bit_identical_to_the_code_before_the_flag():
    assert msbreg.parse_args([]).centroid == msbreg.CENTROID == "leave-one-out"
    torch.manual_seed(9)
    p, t = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    grads = []
    for loss in (centroid_loss_before_issue_19, reading(msbreg.CENTROID)):
        x = p.clone().requires_grad_()
        value = loss(x, t)
        value.backward()
        grads.append((value, x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    # through loss_terms, as training calls it: the same seed and views give the same centroid term and total
    views = [torch.randn(6, 3, 8, 8) for _ in range(4)]
    model = tiny_msbreg()
    _, p, t = model(*views)
    before = centroid_loss_before_issue_19(p, t)
    for kwargs in ({}, {"centroid": "leave-one-out"}):
        loss, terms = msbreg.loss_terms(tiny_msbreg(), views, 1.0, 1.0, seed=3, **kwargs)
        assert torch.equal(terms["centroid"], before)
        assert torch.equal(loss, before + terms["sv"] + terms["brownian"])
    other, _ = msbreg.loss_terms(tiny_msbreg(), views, 1.0, 1.0, seed=3, centroid="all-views")
    assert not torch.equal(other, loss)


# --- (ii) singular values --------------------------------------------------------------------------------------------
def test_singular_value_loss_matches_naive_loop():
    """The mean singular value of each view's normalised (B x D) matrix, from the eigenvalues of its D x D Gram
    matrix built image by image (float64), averaged over the views."""
    torch.manual_seed(2)
    z = torch.randn(3, 7, 4)
    per_view = []
    for view in z.double():
        gram = sum(torch.outer(unit(row), unit(row)) for row in view)                     # (D, D)
        sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
        per_view.append(float(sigma.sum()) / min(view.shape))
    assert msbreg.singular_value_loss(z).item() == pytest.approx(-sum(per_view) / len(per_view), rel=1e-5)


def test_singular_value_loss_extremes():
    torch.manual_seed(3)
    b, d = 8, 4
    collapsed = torch.randn(1, d) * torch.rand(b, 1).add(0.1)              # one direction, any lengths
    assert msbreg.singular_value_loss(collapsed).item() == pytest.approx(-math.sqrt(b) / d, rel=1e-5)
    frame = torch.linalg.qr(torch.randn(d, d))[0] * torch.rand(d, 1).add(0.1)  # orthonormal rows, rescaled
    assert msbreg.singular_value_loss(frame).item() == pytest.approx(-1.0, rel=1e-5)
    both_ways = torch.cat([torch.eye(d), -torch.eye(d)])                   # B = 2D, all singular values sqrt 2
    assert msbreg.singular_value_loss(both_ways).item() == pytest.approx(-math.sqrt(b / d), rel=1e-5)
    spread = msbreg.singular_value_loss(torch.randn(b, d)).item()          # anything else lies in between
    assert -math.sqrt(b / d) < spread < -math.sqrt(b) / d
    # gradient descent from near collapse raises the smaller singular values
    z = (collapsed + 0.01 * torch.randn(b, d)).requires_grad_()
    loss = msbreg.singular_value_loss(z)
    loss.backward()
    assert msbreg.singular_value_loss(z.detach() - 0.1 * z.grad).item() < loss.item()


# --- (iii) Brownian ---------------------------------------------------------------------------------------------------
def test_brownian_loss_matches_naive_loop():
    torch.manual_seed(4)
    z = torch.randn(3, 5, 6)
    value = msbreg.brownian_loss(z, torch.Generator().manual_seed(7))
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))      # the same draw
    cosines = [float(unit(z[i, j]) @ unit(eps[i, j])) for i in range(3) for j in range(5)]
    assert value.item() == pytest.approx(sum(cosines) / len(cosines), rel=1e-5, abs=1e-7)


def test_brownian_gradient_is_tangent_and_reproducible_from_the_seed():
    torch.manual_seed(5)
    z = torch.randn(4, 16, 8)

    def grad(seed):
        x = z.clone().requires_grad_()
        value = msbreg.brownian_loss(x, torch.Generator().manual_seed(seed))
        value.backward()
        return value, x.grad

    v1, g1 = grad(11)
    v2, g2 = grad(11)
    _, g3 = grad(12)
    assert torch.equal(v1, v2) and torch.equal(g1, g2) and not torch.allclose(g1, g3)
    radial = (g1 * z).sum(dim=-1) / z.norm(dim=-1)                        # component along each embedding
    assert radial.abs().max() < 1e-5 * g1.norm(dim=-1).min()
    # the model's generator: the same seed and draw count give the same noise, the next draw new noise
    model = msbreg.MSBReg(TinyEncoder(), 16, 32, 8)
    first = torch.randn(3, generator=model.noise_generator(0, torch.device("cpu")))
    second = torch.randn(3, generator=model.noise_generator(0, torch.device("cpu")))
    model.load_state_dict({**model.state_dict(), "_extra_state": {"noise_draws": 1}})
    assert model.noise_draws == 1 and not torch.equal(first, second)
    assert torch.equal(torch.randn(3, generator=model.noise_generator(0, torch.device("cpu"))), second)


# --- training ---------------------------------------------------------------------------------------------------------
def tiny_msbreg(seed=0):
    torch.manual_seed(seed)
    return msbreg.MSBReg(TinyEncoder(16), 16, hidden_dim=32, proj_dim=8)


def rows(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def test_two_views_with_zero_weights_is_byol(cifar_dir, tmp_path, no_md5):
    """Five steps of --views 2 --sv-weight 0 --brownian-weight 0 against byol.py: the same loss and parameters up
    to float rounding (the centroid normalises the already normalised target once more), the same BatchNorm
    statistics, the same state_dict names (checkpoints interchangeable but for the noise counter)."""
    assert msbreg.view_specs(4) == (byol.VIEWS[0], byol.VIEWS[1]) * 2    # BYOL's two settings alternate
    short = ("--epochs", "1", "--warmup-epochs", "0")   # five steps at the peak LR: parameters move visibly
    reference = tiny_byol()
    assert byol.train(byol.parse_args(tiny_argv(cifar_dir, tmp_path / "byol", *short)), reference) == 0
    model = tiny_msbreg()
    args = msbreg.parse_args(tiny_argv(cifar_dir, tmp_path / "m2", *short, "--views", "2",
                                       "--sv-weight", "0", "--brownian-weight", "0"))
    assert msbreg.train(args, model) == 0
    (byol_row,), (row,) = rows(tmp_path / "byol"), rows(tmp_path / "m2")
    assert row["loss"] == pytest.approx(byol_row["loss"], rel=1e-6) and row["centroid"] == row["loss"]
    assert row["knn_top1"] == byol_row["knn_top1"] and "sv" in row and "brownian" in row
    state = model.state_dict()
    assert state.pop("_extra_state") == {"noise_draws": 5}
    assert list(state) == list(reference.state_dict())
    for name, value in reference.state_dict().items():
        assert torch.allclose(value.float(), state[name].float(), rtol=1e-5, atol=1e-6), name
    # the two forces do change the run
    changed = tiny_msbreg()
    assert msbreg.train(msbreg.parse_args(tiny_argv(cifar_dir, tmp_path / "on", *short, "--views", "2")),
                        changed) == 0
    moved = (changed.encoder.net[1].weight - model.encoder.net[1].weight).abs().max()
    assert moved > 1e-3   # 0.023 measured, against < 3e-7 between msbreg.py at zero weights and byol.py


@pytest.mark.parametrize("name", ["centroid-to-centroid", "all-views"])
def test_centroid_flag_chooses_the_loss_of_the_run(name, cifar_dir, tmp_path, no_md5, monkeypatch, capsys):
    called = {key: 0 for key in READINGS}

    def counted(key):
        loss, formula = msbreg.CENTROID_READINGS[key]

        def spy(p, t):
            called[key] += 1
            return loss(p, t)
        return spy, formula
    for key in READINGS:
        monkeypatch.setitem(msbreg.CENTROID_READINGS, key, counted(key))
    out = tmp_path / "run"
    args = msbreg.parse_args(tiny_argv(cifar_dir, out, "--epochs", "1", "--centroid", name))
    assert msbreg.train(args, tiny_msbreg()) == 0
    assert called == {key: 5 if key == name else 0 for key in READINGS}             # one per micro-batch
    assert msbreg.CENTROID_READINGS[name][1] in capsys.readouterr().out            # the objective line says it
    assert json.loads((out / "args.json").read_text())["centroid"] == name
    (row,) = rows(out)
    assert 0 <= row["centroid"] <= 8


def test_runs_from_before_the_flag_are_the_default_reading(tmp_path):
    """results.py groups a run by the settings that differ from its preset: an args.json written before --centroid
    (no such key) and one written with the default are the same setting; a resumed old run trains leave-one-out."""
    import results
    new = json.loads(json.dumps(vars(msbreg.parse_args(["--dataset", "cifar10", "--views", "2"]))))  # as args.json
    old = {k: v for k, v in new.items() if k != "centroid"}
    assert new["centroid"] == "leave-one-out"
    assert results.settings(old) == results.settings(new) == (("views", 2),)
    caption = {**new, "centroid": "centroid-to-centroid"}
    assert results.settings(caption) == (("centroid", "centroid-to-centroid"), ("views", 2))
    assert results.flags("msbreg", results.settings(caption)) == "--centroid centroid-to-centroid --views 2"
    # --resume of a checkpoint whose saved args predate the flag
    torch.save({"format": runs.CHECKPOINT_FORMAT, "args": old, "step": 5, "epoch": 1}, tmp_path / "last.pt")
    args = msbreg.parse_args(["--resume", str(tmp_path)])
    assert args.centroid == "leave-one-out" and args.views == 2
    assert msbreg.CENTROID_READINGS["leave-one-out"][1] in msbreg.objective(args)


@pytest.mark.parametrize("augment", ["batched", "per-image"])
def test_resume_after_signal_equals_uninterrupted_run_with_four_views(cifar_dir, tmp_path, no_md5, monkeypatch,
                                                                      augment):
    argv = ["--views", "4", "--augment", augment]
    full = tiny_msbreg()
    assert msbreg.train(msbreg.parse_args(tiny_argv(cifar_dir, tmp_path / "full", *argv)), full) == 0

    calls, real = {"n": 0}, msbreg.brownian_loss

    def pre_empted(z, generator):  # SIGTERM during the 7th micro-batch, mid-epoch 2
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(z, generator)
    monkeypatch.setattr(msbreg, "brownian_loss", pre_empted)
    out = tmp_path / "interrupted"
    assert msbreg.train(msbreg.parse_args(tiny_argv(cifar_dir, out, *argv)), tiny_msbreg()) == 128 + signal.SIGTERM
    assert runs.load_checkpoint(out / "last.pt")["step"] == 7
    monkeypatch.setattr(msbreg, "brownian_loss", real)

    resumed = tiny_msbreg(seed=123)    # everything, the noise counter included, must come from the checkpoint
    args = msbreg.parse_args(["--resume", str(out), "--workers", "0"])
    assert args.views == 4 and args.augment == augment
    assert msbreg.train(args, resumed) == 0
    assert resumed.noise_draws == full.noise_draws == 10
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert a == b if name == "_extra_state" else torch.equal(a, b), name
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    assert rows(out)[-1]["knn_top1"] == rows(tmp_path / "full")[-1]["knn_top1"]


def test_msbreg_cifar_end_to_end_with_linear_eval(cifar_dir, tmp_path):
    out = tmp_path / "run"
    proc = check_ok(run_script("msbreg.py", "--data-dir", cifar_dir, "--batch-size", "8", "--accum-steps", "2",
                               "--subset", "8", "--out-dir", out, *TINY))
    assert "M = 4 views" in proc.stdout and "micro-batches of 4 images" in proc.stderr
    (row,) = rows(out)
    alignment = [key for key in row if key.endswith("alignment")]        # the uniformity analysis ran
    for key in ("loss", "centroid", "sv", "brownian", "tau", "knn_top1", *alignment):
        assert isinstance(row[key], float) and math.isfinite(row[key]), key
    assert len(alignment) == 1
    assert row["loss"] == pytest.approx(row["centroid"] + row["sv"] + row["brownian"], rel=1e-5)  # unit weights
    args = json.loads((out / "args.json").read_text())
    assert (args["views"], args["sv_weight"], args["brownian_weight"]) == (4, 1.0, 1.0)
    assert torch.load(out / "last.pt", weights_only=True)["model"]["_extra_state"] == {"noise_draws": 2}
    check_ok(run_script("linear_eval.py", "--checkpoint", out, "--epochs", "1", "--workers", "0", "--precompute"))
    res = json.loads((out / "linear_eval_test.json").read_text())
    assert res["method"] == "msbreg" and res["encoder_unchanged"] and 0 <= res["top1"] <= 100


@pytest.mark.parametrize("views", ["1", "0"])
def test_fewer_than_two_views_is_one_line_and_exit_2(views, tmp_path):
    proc = run_script("msbreg.py", "--views", views, "--data-dir", tmp_path, "--out-dir", tmp_path / "run")
    check_one_line_error(proc, "argument --views: must be at least 2")
    assert proc.returncode == 2 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,text", [
    (["--sv-weight", "nan"], "argument --sv-weight: must be a finite number, got nan"),
    (["--brownian-weight", "inf"], "argument --brownian-weight: must be a finite number, got inf"),
    (["--brownian-weight", "x"], "invalid float value: 'x'"),
])
def test_bad_weights(capsys, argv, text):
    with pytest.raises(SystemExit) as exit_:
        msbreg.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and text in err
