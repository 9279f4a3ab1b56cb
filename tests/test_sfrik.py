"""SFRIK (Zheng et al., 2023): the Legendre polynomials, the MMD to the uniform law and the invariance term against
naive loops and closed forms; its presets and augmentations; byol_uniformity.py --uniformity legendre; end to end."""
import argparse
import itertools
import json
import math

import pytest
import torch

import byol
import byol_uniformity
import common
from support import batched_views, cli
import sfrik
from conftest import run_script
from test_cli import check_ok, check_one_line_error


def seed_legendre(t, degree, q):
    """P_1..P_3 in dimension q as ../shared/seeds/sfrik.md writes them out, on a Python float."""
    return {1: t, 2: (q * t ** 2 - 1) / (q - 1), 3: ((q + 2) * t ** 3 - 3 * t) / (q - 1)}[degree]


def naive_mmd(z, weights):
    """M(Z) = (1 / n^2) sum over all (i, j), the diagonal included, of sum_l b_l P_l(<z_i, z_j>), by a double loop."""
    z = [v / v.norm() for v in z.double()]
    n, q = len(z), len(z[0])
    total = sum(sum(b * seed_legendre(float(z[i] @ z[j]), l, q) for l, b in enumerate(weights, start=1))
                for i, j in itertools.product(range(n), repeat=2))
    return total / n ** 2


# --- Legendre polynomials -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [2, 3, 7, 8192])
def test_legendre_matches_the_written_out_polynomials_and_is_one_at_one(q):
    t = torch.linspace(-1, 1, 11, dtype=torch.float64)
    for degree in (1, 2, 3):
        expect = torch.tensor([seed_legendre(float(x), degree, q) for x in t], dtype=torch.float64)
        assert torch.allclose(common.legendre(t, degree, q), expect, atol=1e-12)
    for degree in range(6):
        assert common.legendre(torch.ones(1, dtype=torch.float64), degree, q).item() == pytest.approx(1.0, abs=1e-12)


def test_legendre_in_dimensions_two_and_three_are_chebyshev_and_legendre():
    theta = torch.linspace(0, math.pi, 9, dtype=torch.float64)
    t = theta.cos()
    for degree in range(5):  # S^1: P_l(cos theta) = cos(l theta)
        assert torch.allclose(common.legendre(t, degree, 2), (degree * theta).cos(), atol=1e-12)
    classical = {2: (3 * t ** 2 - 1) / 2, 3: (5 * t ** 3 - 3 * t) / 2, 4: (35 * t ** 4 - 30 * t ** 2 + 3) / 8}
    for degree, expect in classical.items():  # S^2: the classical Legendre polynomials
        assert torch.allclose(common.legendre(t, degree, 3), expect, atol=1e-12)


@pytest.mark.parametrize("q", [2, 3, 5, 16])
def test_legendre_orthogonal_under_the_uniform_law(q):
    """For x uniform on S^(q-1) and a fixed unit y, t = <x, y> = cos(theta) has density ~ sin(theta)^(q-2): the P_l are
    orthogonal for it and every P_l with l >= 1 has mean 0 (why the MMD needs no sample of the uniform law)."""
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    w = theta.sin() ** (q - 2)
    mean = lambda f: torch.trapezoid(f * w, theta) / torch.trapezoid(w, theta)  # noqa: E731
    p = [common.legendre(theta.cos(), degree, q) for degree in range(5)]
    for k, l in itertools.combinations_with_replacement(range(5), 2):
        value = mean(p[k] * p[l]).item()
        if k != l:
            assert abs(value) < 1e-6, (k, l, value)
        else:
            assert value > 0
        if k == 0 and l > 0:
            assert abs(mean(p[l]).item()) < 1e-6


def test_legendre_rejects_dimension_one():
    with pytest.raises(ValueError):
        common.legendre(torch.zeros(2), 2, 1)


# --- the MMD to the uniform law ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [(1.0, 40.0, 40.0), (0.5, 0.0, 3.0), (2.0,)])
def test_mmd_matches_naive_double_loop(weights):
    torch.manual_seed(0)
    z = torch.randn(7, 5)
    assert common.mmd_to_uniform(z, weights).item() == pytest.approx(naive_mmd(z, weights), rel=1e-5, abs=1e-6)
    scaled = z * (torch.rand(7, 1) * 5 + 0.1)  # rows are L2-normalised first
    assert common.mmd_to_uniform(scaled, weights).item() == pytest.approx(naive_mmd(z, weights), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n,q", [(1, 2), (5, 3), (16, 64)])
def test_mmd_of_a_collapse_is_the_sum_of_the_weights(n, q):
    z = torch.randn(1, q).expand(n, q) * torch.rand(n, 1).add(0.5)
    assert common.mmd_to_uniform(z).item() == pytest.approx(81.0, rel=1e-6)
    assert common.mmd_to_uniform(z, (2.0, 3.0, 0.5)).item() == pytest.approx(5.5, rel=1e-6)


@pytest.mark.parametrize("q", [2, 4, 32])
def test_mmd_of_an_orthonormal_frame(q):
    """n = q, z_i = e_i: P_1(0) = P_3(0) = 0, P_2(0) = -1 / (q - 1), so M = (q (b1 + b2 + b3) - q b2) / q^2."""
    assert common.mmd_to_uniform(torch.eye(q), (1.0, 40.0, 40.0)).item() == pytest.approx(41 / q, rel=1e-6)


@pytest.mark.parametrize("q", [2, 3, 10, 64])
def test_mmd_of_the_cross_polytope_is_zero(q):
    """Our closed form: the 2q points +-e_i form a spherical 3-design, so degrees 1-3 all vanish. Degree 1 and 3:
    the points cancel in antipodal pairs; degree 2: 4q pairs at t = +-1 (P_2 = 1) against 2q (2q - 2) orthogonal
    pairs at P_2(0) = -1 / (q - 1), i.e. 4q - 4q = 0."""
    z = torch.cat([torch.eye(q), -torch.eye(q)])
    assert common.mmd_to_uniform(z, (1.0, 40.0, 40.0)).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("q", [2, 3, 8])
def test_mmd_of_the_regular_simplex(q):
    """Our closed form: the q + 1 vertices of the regular simplex (<z_i, z_j> = -1/q) are a spherical 2-design, so
    degrees 1 and 2 vanish, and degree 3 leaves (q + 1)(1 + q P_3(-1/q)) / (q + 1)^2 = (q + 2) / q^2."""
    e = torch.eye(q + 1, dtype=torch.float64)
    centred = e - e.mean(dim=0)                                   # q + 1 points in a q-dimensional subspace
    basis = torch.linalg.svd(centred).Vh[:q]                      # an orthonormal basis of that subspace
    z = (centred @ basis.T).float()                               # (q + 1, q)
    zn = torch.nn.functional.normalize(z, dim=1)
    assert torch.allclose(zn @ zn.T, torch.full((q + 1, q + 1), -1 / q) + (1 + 1 / q) * torch.eye(q + 1), atol=1e-6)
    b1, b2, b3 = 1.0, 40.0, 40.0
    assert common.mmd_to_uniform(z, (b1, b2, b3)).item() == pytest.approx(b3 * (q + 2) / q ** 2, rel=1e-5)


@pytest.mark.parametrize("n", [4, 5, 12])
def test_mmd_of_a_regular_polygon(n):
    """Our closed form on S^1, where P_l(cos a) = cos(l a): M = sum_l b_l |mean_k exp(i l theta_k)|^2, which is 0
    for the regular n-gon unless n divides l; so any n >= 4 cancels degrees 1-3 (and a triangle keeps b_3)."""
    theta = 2 * math.pi * torch.arange(n) / n + 0.3
    z = torch.stack([theta.cos(), theta.sin()], dim=1)
    assert common.mmd_to_uniform(z, (1.0, 40.0, 40.0)).item() == pytest.approx(0.0, abs=2e-5)
    if n == 12:  # every 4th vertex: a triangle, where only degree 3 survives
        assert common.mmd_to_uniform(z[::4], (1.0, 40.0, 40.0)).item() == pytest.approx(40.0, rel=1e-5)


def test_mmd_is_nonnegative_and_at_most_the_sum_of_the_weights():
    """A V-statistic of a positive-definite kernel: ||mean feature||^2 >= 0; and |P_l| <= 1 on [-1, 1]."""
    torch.manual_seed(1)
    for n, q in ((3, 2), (50, 3), (64, 128)):
        value = common.mmd_to_uniform(torch.randn(n, q)).item()
        assert -1e-5 <= value <= 81.0


def test_mmd_gradient_is_tangent_and_descends():
    torch.manual_seed(2)
    z = torch.randn(16, 8, requires_grad=True)
    m = common.mmd_to_uniform(z)
    m.backward()
    radial = (z.grad * z).sum(dim=1) / z.norm(dim=1)                # component along each z_i
    assert radial.abs().max() < 1e-5 * z.grad.norm()
    with torch.no_grad():
        stepped = z - 0.01 * z.grad / z.grad.norm()
    assert common.mmd_to_uniform(stepped) < m


# --- invariance and the total loss -----------------------------------------------------------------------------------
def test_invariance_loss_naive_and_closed_forms():
    torch.manual_seed(3)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    a, b = z1 / z1.norm(dim=1, keepdim=True), z2 / z2.norm(dim=1, keepdim=True)
    naive = sum(float((a[i] - b[i]).pow(2).sum()) for i in range(6)) / (6 * 5)
    assert sfrik.invariance_loss(z1, z2).item() == pytest.approx(naive, rel=1e-6)
    assert sfrik.invariance_loss(z1, 3 * z1).item() == pytest.approx(0.0, abs=1e-7)       # identical views
    assert sfrik.invariance_loss(z1, -0.5 * z1).item() == pytest.approx(4 / 5, rel=1e-6)  # antipodal: 4 / q


def test_sfrik_loss_is_the_weighted_sum_and_its_gradient_is_tangent():
    torch.manual_seed(4)
    z1, z2 = torch.randn(10, 6, requires_grad=True), torch.randn(10, 6, requires_grad=True)
    loss, inv, mmd = sfrik.sfrik_loss(z1, z2, 4000.0, 2.0, (1.0, 40.0, 40.0))
    expect = 4000 * sfrik.invariance_loss(z1, z2) + (common.mmd_to_uniform(z1) + common.mmd_to_uniform(z2))
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    assert inv.item() == pytest.approx(sfrik.invariance_loss(z1, z2).item())
    loss.backward()
    for z in (z1, z2):
        assert ((z.grad * z).sum(dim=1).abs() < 1e-4 * z.grad.norm(dim=1) * z.norm(dim=1) + 1e-6).all()


def test_losses_are_float32_under_bf16_autocast():
    """Inside bf16 autocast, from bf16 embeddings (as the expander gives them on CUDA), the MMD and the invariance
    are float32 and exactly the float32 computation on the same (upcast) embeddings."""
    torch.manual_seed(5)
    layer = torch.nn.Linear(8, 16)
    x1, x2 = torch.randn(12, 8), torch.randn(12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = layer(x1), layer(x2)
        assert z1.dtype == torch.bfloat16
        mmd, inv = common.mmd_to_uniform(z1), sfrik.invariance_loss(z1, z2)
    assert mmd.dtype == inv.dtype == torch.float32
    assert torch.equal(mmd, common.mmd_to_uniform(z1.float()))
    assert torch.equal(inv, sfrik.invariance_loss(z1.float(), z2.float()))


# --- model, presets, augmentations -----------------------------------------------------------------------------------
def test_expander_shape_and_the_official_size():
    head = sfrik.expander(16, (32, 32, 8))
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[-1].bias is None and head[-1].out_features == 8
    assert "BatchNorm1d" not in [type(m).__name__ for m in sfrik.expander(16, (32, 8), batchnorm=False)]
    with torch.device("meta"):  # the official 8192-8192-8192 on ResNet-18's 512 features: 138 M parameters
        n = sum(p.numel() for p in sfrik.expander(512, (8192, 8192, 8192)).parameters())
    assert n == 512 * 8192 + 8192 + 2 * 8192 + 8192 * 8192 + 8192 + 2 * 8192 + 8192 * 8192
    assert 138e6 < n < 139e6


def test_presets_follow_the_official_recipes():
    stl = sfrik.parse_args(["--dataset", "stl10"])
    assert (stl.arch, stl.batch_size, stl.epochs, stl.base_lr, stl.weight_decay, stl.image_size) == (
        "resnet18", 2048, 100, 1.2, 1e-6, 64)
    assert (stl.expander, stl.inv_weight, stl.mmd_weight, stl.legendre_weights) == (
        (8192, 8192, 8192), 4000.0, 1.0, (1.0, 40.0, 40.0))
    assert common.resolve_stem(stl.stem, "stl10") == "imagenet" and stl.warmup_epochs == 10
    imagenet = sfrik.parse_args(["--dataset", "imagenet"])
    assert (imagenet.arch, imagenet.epochs, imagenet.base_lr, imagenet.inv_weight, imagenet.expander) == (
        "resnet50", 200, 0.4, 40000.0, (8192, 8192, 32768))
    cifar = sfrik.parse_args(["--dataset", "cifar10", "--expander", "64-64-32"])
    assert (cifar.epochs, cifar.batch_size, cifar.expander) == (300, 1024, (64, 64, 32))
    # Wang & Isola's augmentations for STL-10 (and our CIFAR rows), VICReg's = BYOL's for ImageNet
    assert sfrik.VIEWS["stl10"] == sfrik.VIEWS["cifar10"] == sfrik.AUH and sfrik.VIEWS["imagenet"] == byol.VIEWS


def test_the_stl10_views_jitter_strongly_always_and_never_blur():
    view = common.ssl_augmentation("stl10", 64, *sfrik.AUH[0])
    jitter = next(t for t in view.transforms if type(t).__name__ == "RandomApply")
    assert jitter.p == 1.0 and jitter.transforms[0].hue == (-0.4, 0.4)
    assert jitter.transforms[0].saturation == (0.6, 1.4)
    assert not any("Blur" in type(t).__name__ or "Solarize" in type(t).__name__ for t in view.transforms)
    p = batched_views.view_params(2000, 96, 96, *sfrik.AUH[0][:2], torch.Generator().manual_seed(0), "cpu", *sfrik.AUH[0][2:])
    assert p["jitter"].all() and not p["blur"].any() and not p["solarize"].any()
    lo, hi = p["factors"].min(dim=0).values, p["factors"].max(dim=0).values
    assert torch.allclose(lo, torch.tensor([0.6, 0.6, 0.6, -0.4]), atol=0.01)
    assert torch.allclose(hi, torch.tensor([1.4, 1.4, 1.4, 0.4]), atol=0.01)
    default = batched_views.view_params(2000, 96, 96, 0.0, 0.0, torch.Generator().manual_seed(0))  # unchanged: Appendix B.5
    assert default["factors"][:, 2].max() < 1.21 and default["factors"][:, 3].max() < 0.11
    images = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    x = batched_views.batched_view(images, "stl10", 64, *sfrik.AUH[0], g=torch.Generator().manual_seed(1))
    assert x.shape == (3, 3, 64, 64) and torch.isfinite(x).all()
    share = batched_views.share_view(images[1:], 3, slice(1, 3), "stl10", 64, *sfrik.AUH[0],  # one process's share
                              g=torch.Generator().manual_seed(1))
    assert torch.allclose(share, x[1:], atol=1e-6)


def test_byol_uniformity_legendre_term_is_the_mmd():
    args = byol_uniformity.parse_args(["--uniformity", "legendre", "--legendre-weights", "1,2,3"])
    torch.manual_seed(6)
    out = {"z1": torch.randn(8, 5), "z2": torch.randn(8, 5)}
    lam, value = byol_uniformity.uniformity_term(args)(None, out)["uniformity"]
    expect = (naive_mmd(out["z1"], (1, 2, 3)) + naive_mmd(out["z2"], (1, 2, 3))) / 2
    assert lam == 0.125 and value.item() == pytest.approx(expect, rel=1e-5)
    gaussian = byol_uniformity.parse_args([])
    _, value = byol_uniformity.uniformity_term(gaussian)(None, out)["uniformity"]
    expect = (common.uniformity_loss(out["z1"]) + common.uniformity_loss(out["z2"])) / 2
    assert gaussian.uniformity == "gaussian" and value.item() == pytest.approx(expect.item())
    on_encoder = byol_uniformity.parse_args(["--uniformity", "legendre", "--unif-on", "encoder"])
    out.update(h1=torch.randn(8, 6), h2=torch.randn(8, 6))  # the encoder features of the two views
    _, value = byol_uniformity.uniformity_term(on_encoder)(None, out)["uniformity"]
    expect = (naive_mmd(out["h1"], (1, 40, 40)) + naive_mmd(out["h2"], (1, 40, 40))) / 2
    assert value.item() == pytest.approx(expect, rel=1e-5)


# --- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,flags,text", [
    ("byol_uniformity.py", ["--uniformity", "rbf"], "invalid choice: 'rbf'"),
    ("byol_uniformity.py", ["--uniformity", "legendre", "--legendre-weights", "1,-40,40"], "must be a finite number"),
    ("sfrik.py", ["--expander", "64-0-32"], "every width must be a positive integer"),
])
def test_bad_sfrik_flags(script, flags, text, tmp_path):
    proc = run_script(script, *flags, "--data-dir", tmp_path, "--out-dir", tmp_path / "run")
    check_one_line_error(proc, text)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["8192-1", "", "64--32", "a-b"])
def test_more_bad_expanders(text):
    with pytest.raises(argparse.ArgumentTypeError, match="width"):
        sfrik.expander_widths(text)


@pytest.mark.parametrize("text,match", [("1,x", "comma-separated numbers"), ("", "comma-separated numbers"),
                                        ("1,nan", ">= 0"), ("inf", ">= 0"), ("-0.5", ">= 0")])
def test_more_bad_legendre_weights(text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        cli.legendre_weights(text)
    assert cli.legendre_weights("1,40,40") == (1.0, 40.0, 40.0) and cli.legendre_weights("0,1") == (0.0, 1.0)


def test_legendre_weights_need_the_legendre_kernel(tmp_path):
    with pytest.raises(common.UserError, match="needs --uniformity legendre"):
        byol_uniformity.main(["--legendre-weights", "1,40,40", "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    assert byol_uniformity.parse_args(["--uniformity", "legendre"]).legendre_weights == (1.0, 40.0, 40.0)
    assert byol_uniformity.parse_args([]).legendre_weights is None
    assert sfrik.expander_widths("64,64,32") == sfrik.expander_widths("64-64-32") == (64, 64, 32)


# --- end to end -----------------------------------------------------------------------------------------------------
TINY_SFRIK = ["--epochs", "1", "--workers", "0", "--expander", "64-64-32", "--batch-size", "24"]


def test_sfrik_end_to_end_then_linear_eval(cifar_dir, tmp_path):
    out = tmp_path / "run"
    proc = check_ok(run_script("sfrik.py", "--data-dir", cifar_dir, "--out-dir", out, "--accum-steps", "2",
                               *TINY_SFRIK))
    assert "(SFRIK)" in proc.stdout and "b = (1, 40, 40), q = 32" in proc.stdout
    assert "the MMD covers micro-batches of 12 images" in proc.stderr
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["invariance"] <= 4 / 32 and 0 <= row["mmd"] <= 81
    assert row["loss"] == pytest.approx(4000 * row["invariance"] + row["mmd"], rel=1e-4)
    assert 0 <= row["eval_mmd_legendre"] <= 81 and "eval_mhe_projector" in row and "tau" not in row
    args = json.loads((out / "args.json").read_text())
    assert args["expander"] == [64, 64, 32] and args["inv_weight"] == 4000.0 and args["method"] == "sfrik"
    check_ok(run_script("linear_eval.py", "--checkpoint", out, "--epochs", "1", "--workers", "0", "--precompute"))
    res = json.loads((out / "linear_eval_test.json").read_text())
    assert res["method"] == "sfrik" and res["encoder_unchanged"] and 0 <= res["top1"] <= 100


def test_byol_uniformity_legendre_end_to_end(cifar_dir, tmp_path):
    out = tmp_path / "run"
    proc = check_ok(run_script("byol_uniformity.py", "--uniformity", "legendre", "--data-dir", cifar_dir,
                               "--out-dir", out, "--epochs", "1", "--workers", "0", "--hidden-dim", "64",
                               "--proj-dim", "32", "--batch-size", "24"))
    assert "SFRIK's Legendre MMD" in proc.stdout and "Eq. 4" in proc.stdout
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["uniformity"] <= 81 and "byol" in row  # the MMD, where Eq. 2 would be negative
    assert row["eval_uniformity"] < 0 <= row["eval_mmd_legendre"] <= 81  # the analysis of the encoder features
    args = json.loads((out / "args.json").read_text())
    assert args["uniformity"] == "legendre" and args["legendre_weights"] == [1.0, 40.0, 40.0]
