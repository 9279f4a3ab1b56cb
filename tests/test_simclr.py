"""SimCLR's NT-Xent (Eq. 1) against a naive per-anchor loop and closed forms; an end-to-end run."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T

import common
import loop
from support import batched_views
import simclr
from conftest import run_script
from test_cli import check_ok


def naive_nt_xent(z1, z2, t):
    """Eq. 1 anchor by anchor: positive = the other view, negatives = every other view of the batch."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denom)
    return total / n


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_naive_loop(t):
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert simclr.nt_xent(z1, z2, t).item() == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-5)


def test_nt_xent_closed_form_aligned_positives_orthogonal_negatives():
    b, t = 4, 0.5
    e = torch.eye(8)[:b]     # positives identical, all other views orthogonal: cos = 1 and 0
    expect = math.log(1 + (2 * b - 2) * math.exp(-1 / t))
    assert simclr.nt_xent(e, e, t).item() == pytest.approx(expect, rel=1e-6)


def test_nt_xent_symmetric_and_scale_invariant():
    torch.manual_seed(1)
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3)
    assert simclr.nt_xent(z1, z2, 0.5).item() == pytest.approx(simclr.nt_xent(z2, z1, 0.5).item(), rel=1e-6)
    assert simclr.nt_xent(3 * z1, 0.2 * z2, 0.5).item() == pytest.approx(simclr.nt_xent(z1, z2, 0.5).item(), rel=1e-5)


def test_sgd_on_inputs_lowers_nt_xent():
    torch.manual_seed(2)
    z1, z2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    opt = torch.optim.SGD([z1, z2], lr=0.5)
    first = simclr.nt_xent(z1, z2, 0.5).item()
    for _ in range(20):
        opt.zero_grad()
        simclr.nt_xent(z1, z2, 0.5).backward()
        opt.step()
    assert simclr.nt_xent(z1, z2, 0.5).item() < first - 0.1


def test_projector_and_presets():
    args = simclr.parse_args(["--dataset", "cifar10"])
    assert (args.temperature, args.base_lr, args.arch, args.epochs) == (0.5, 1.0, "resnet18", 300)
    assert simclr.parse_args(["--dataset", "cifar10", "--epochs", "1000"]).arch == "resnet50"
    assert simclr.parse_args(["--dataset", "imagenet"]).temperature == 0.1
    model = simclr.build_model(args)
    head = model.projector
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (512, 512, 128)
    z1, z2 = model(torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32))
    assert z1.shape == z2.shape == (3, 128)


def test_head_has_batchnorm_on_every_layer():
    """SimCLR's head: BatchNorm after both Linear layers, the last one included; no Linear bias; the last
    BatchNorm scales but does not shift (center=False), so its shift is zero and never trained."""
    head = simclr.projection_head(16, 8)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert head[0].bias is None and head[3].bias is None
    assert head[4].weight.requires_grad and not head[4].bias.requires_grad and not head[4].bias.any()
    torch.manual_seed(3)
    z = head.train()(torch.randn(32, 16))
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-5)  # batch-normalised output, no shift
    plain = simclr.projection_head(16, 8, batchnorm=False)  # Table 4's 'BN x'
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain) and plain[0].bias is not None


@pytest.mark.parametrize("dataset,strength,jitter", [("cifar10", 0.5, (0.4, 0.4, 0.4, 0.1)),
                                                     ("stl10", 0.5, (0.4, 0.4, 0.4, 0.1)),
                                                     ("imagenet", 1.0, (0.8, 0.8, 0.8, 0.2))])
def test_colour_distortion_strength_per_preset_reaches_the_views(dataset, strength, jitter, monkeypatch):
    """SimCLR's colour distortion of strength s, ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s): 0.5 on CIFAR/STL-10
    (SimCLR App. B.9), 1.0 on ImageNet; both views of the run get it, on both augmentation paths."""
    args = simclr.parse_args(["--dataset", dataset])
    assert args.jitter_strength == strength
    seen = {}
    monkeypatch.setattr(loop, "pretrain", lambda args, model, loss_fn, views, objective: seen.update(views=views))
    simclr.train(args, simclr.SimCLR(nn.Flatten(), 12, 4))
    assert len(seen["views"]) == 2
    for blur_p, solarize_p, j in seen["views"]:
        assert (blur_p, solarize_p) == (0.5, 0.0)
        assert tuple(j[k] for k in ("brightness", "contrast", "saturation", "hue")) == pytest.approx(jitter)
        ops = [t for t in common.ssl_augmentation(dataset, 32, blur_p, solarize_p, j).transforms
               if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], T.ColorJitter)]
        cj = ops[0].transforms[0]
        assert cj.saturation == pytest.approx((1 - jitter[2], 1 + jitter[2])) and cj.hue == pytest.approx(
            (-jitter[3], jitter[3]))
        f = batched_views.view_params(4000, 8, 8, blur_p, solarize_p, torch.Generator().manual_seed(0), jitter=j)["factors"]
        for k, s in enumerate(jitter):
            lo, hi = (-s, s) if k == 3 else (1 - s, 1 + s)
            assert lo <= f[:, k].min() < lo + 0.01 and hi - 0.01 < f[:, k].max() <= hi


def test_simclr_end_to_end(cifar_dir, tmp_path):
    out = tmp_path / "run"
    proc = check_ok(run_script("simclr.py", "--data-dir", cifar_dir, "--batch-size", "24", "--accum-steps", "2",
                               "--out-dir", out, "--epochs", "1", "--workers", "0", "--proj-dim", "32"))
    assert "NT-Xent" in proc.stdout and "negatives come from micro-batches of 12 images" in proc.stderr
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["loss"] > 0 and "eval_uniformity" in row and "eval_alignment" in row and "eval_mhe_projector" in row
    assert "tau" not in row and "eval_mhe_predictor" not in row and "uniformity" not in row
    check_ok(run_script("linear_eval.py", "--checkpoint", out, "--epochs", "1", "--workers", "0", "--precompute"))
    assert json.loads((out / "linear_eval_test.json").read_text())["method"] == "simclr"
