"""The training loop: gradient accumulation, EMA once per optimizer step, exact resume, non-finite loss, and an
evaluation that leaves the networks untouched."""
import copy
import json
import os
import signal

import pytest
import torch
import torch.nn as nn

import byol
import common
import loop
from support import batched_views, runs
from conftest import TinyEncoder


def tiny_argv(cifar_dir, out_dir, *extra):
    """Two epochs of 5 steps on the tiny CIFAR-10 with small heads; later flags override earlier ones."""
    return ["--data-dir", str(cifar_dir), "--batch-size", "10", "--epochs", "2", "--workers", "0",
            "--hidden-dim", "32", "--proj-dim", "8", "--knn-every", "0", "--out-dir", str(out_dir), *extra]


def tiny_args(cifar_dir, out_dir, *extra):
    return byol.parse_args(tiny_argv(cifar_dir, out_dir, *extra))


def tiny_byol(seed=0):
    torch.manual_seed(seed)
    return byol.BYOL(TinyEncoder(16), 16, hidden_dim=32, proj_dim=8)


# --- gradient accumulation (Section 5.1) ------------------------------------------------------------------------
def test_accumulation_equals_full_batch_without_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    x1, x2 = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)

    def loss_fn(model, a, b):  # a per-sample mean, as every loss of the paper
        return ((model(a) - model(b).detach()) ** 2).sum(dim=1).mean(), {}

    results = []
    for n in (1, 2, 4):
        model = copy.deepcopy(net)
        opt = common.LARS(model.parameters(), lr=0.3, weight_decay=0.01)
        micro = iter(zip(x1.chunk(n), x2.chunk(n)))
        terms = loop.train_step(model, opt, loss_fn, micro, n, torch.device("cpu"))
        results.append((terms["loss"].item(), [p.detach().clone() for p in model.parameters()]))
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for p, q in zip(params, results[0][1]):
            assert torch.allclose(p, q, atol=1e-6)
    assert not torch.allclose(results[0][1][1], net[1].bias)  # the step did move the parameters


@pytest.mark.parametrize("accum", [1, 2])
def test_ema_and_tau_move_once_per_optimizer_step(cifar_dir, tmp_path, no_md5, monkeypatch, accum):
    calls = {"tau": [], "ema": 0, "loss": 0}
    real_tau, real_update = common.ema_tau, byol.BYOL.update_target
    monkeypatch.setattr(common, "ema_tau", lambda k, K, b: calls["tau"].append((k, K)) or real_tau(k, K, b))

    def counting_update(self, tau):
        calls["ema"] += 1
        return real_update(self, tau)
    monkeypatch.setattr(byol.BYOL, "update_target", counting_update)

    def count_loss(model, out):
        calls["loss"] += 1
        return {}
    args = tiny_args(cifar_dir, tmp_path / "run", "--accum-steps", str(accum))
    assert byol.train(args, tiny_byol(), extra_terms=count_loss) == 0
    steps = 2 * (50 // 10)
    assert calls["ema"] == steps and calls["tau"] == [(k, steps) for k in range(steps)]
    assert calls["loss"] == steps * accum
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [5, 10]
    assert rows[-1]["tau"] == pytest.approx(common.ema_tau(steps - 1, steps, 0.99))


# --- resume -------------------------------------------------------------------------------------------------------
def signal_at(loss_call, signum=signal.SIGTERM):
    """An extra term that sends us `signum` during the given micro-batch, like a cluster pre-empting the job."""
    count = {"n": 0}

    def extra(model, out):
        count["n"] += 1
        if count["n"] == loss_call:
            os.kill(os.getpid(), signum)
        return {}
    return extra


@pytest.mark.parametrize("augment", ["batched", "per-image"])
@pytest.mark.parametrize("stop_at,signum", [(7, signal.SIGTERM), (5, signal.SIGINT)])  # mid-epoch; epoch's end
def test_resume_after_signal_equals_uninterrupted_run(cifar_dir, tmp_path, no_md5, stop_at, signum, augment):
    full = tiny_byol()
    assert byol.train(tiny_args(cifar_dir, tmp_path / "full", "--augment", augment), full) == 0

    out = tmp_path / "interrupted"
    status = byol.train(tiny_args(cifar_dir, out, "--augment", augment), tiny_byol(),
                        extra_terms=signal_at(stop_at, signum))
    assert status == 128 + signum
    assert runs.load_checkpoint(out / "last.pt")["step"] == stop_at
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = tiny_byol(seed=123)  # different init: everything must come from the checkpoint
    args = byol.parse_args(["--resume", str(out), "--workers", "0"])
    assert args.epochs == 2 and args.batch_size == 10 and args.augment == augment
    assert byol.train(args, resumed) == 0
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    full_rows = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["knn_top1"] == full_rows[-1]["knn_top1"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(cifar_dir, tmp_path, no_md5):
    count = {"n": 0}

    def explode(model, out):
        count["n"] += 1
        return {"bad": (1.0, torch.tensor(float("nan") if count["n"] >= 7 else 0.0))}
    out = tmp_path / "run"
    with pytest.raises(common.UserError, match="non-finite loss"):
        byol.train(tiny_args(cifar_dir, out, "--log-every", "1"), tiny_byol(), extra_terms=explode)
    ckpt = runs.load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 5 and ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_refuses_to_overwrite_a_run(cifar_dir, tmp_path, no_md5):
    assert byol.train(tiny_args(cifar_dir, tmp_path / "run", "--epochs", "1"), tiny_byol()) == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(common.UserError, match="already holds a run"):
        byol.train(tiny_args(cifar_dir, tmp_path / "run", "--epochs", "1"), tiny_byol())
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    # a checkpoint whose model no longer fits (the heads' last Linear had a bias before issue 9): one line, no traceback
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del ckpt[runs.CHECKSUM]  # written before checkpoints carried a checksum
    ckpt["model"]["projector.3.bias"] = torch.zeros(8)
    (tmp_path / "old").mkdir()
    torch.save(ckpt, tmp_path / "old" / "last.pt")
    with pytest.raises(common.UserError, match='another shape than this version builds: .*"projector.3.bias"'):
        byol.train(byol.parse_args(["--resume", str(tmp_path / "old")]), tiny_byol())


# --- evaluation does not touch training state ---------------------------------------------------------------------
@pytest.mark.parametrize("device", [None, torch.device("cpu")])   # per-image DataLoader; uint8 on the device
def test_knn_monitor_leaves_networks_untouched(cifar_dir, no_md5, device):
    model = tiny_byol()
    model.train()
    before = copy.deepcopy(model.state_dict())
    data = common.load_data("cifar10", cifar_dir, "test")
    bank, evals = batched_views.eval_loaders(data, "cifar10", 32, 16, 0, device)
    acc = common.knn_accuracy(model.encoder, bank, evals, 10, torch.device("cpu"), k=5)
    assert 0 <= acc <= 100
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k   # weights and BN running statistics, online and target


def test_val_split_holds_out_from_pretraining(cifar_dir, no_md5):
    data = common.load_data("cifar10", cifar_dir, "val")
    assert len(data.eval) + len(data.bank) == 50 and len(data.pretrain) == len(data.bank) == 10  # 1 of 5 per class
    assert not set(data.pretrain.indices) & set(data.eval.indices)


def test_subset_keeps_the_first_images_of_each_split(cifar_dir, no_md5):
    data = common.load_data("cifar10", cifar_dir, "test", subset=7)
    assert len(data.pretrain) == len(data.bank) == len(data.eval) == 7
    assert list(data.eval.indices) == list(range(7))


def test_compile_gives_the_eager_result(cifar_dir, tmp_path, no_md5):
    eager, compiled = tiny_byol(), tiny_byol()
    flags = ("--epochs", "1", "--analysis-samples", "0")
    assert byol.train(tiny_args(cifar_dir, tmp_path / "eager", *flags), eager) == 0
    assert byol.train(tiny_args(cifar_dir, tmp_path / "compiled", *flags, "--compile"), compiled) == 0
    ckpt = runs.load_checkpoint(tmp_path / "compiled" / "last.pt")
    assert list(ckpt["model"]) == list(eager.state_dict())          # names unchanged: checkpoints interchangeable
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
