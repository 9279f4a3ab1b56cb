"""SimCLR's NT-Xent (Eq. 1) against a naive per-anchor loop and closed forms; an end-to-end run."""
import json
import math

import pytest
import torch

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


def test_simclr_end_to_end(cifar_dir, tmp_path):
    out = tmp_path / "run"
    proc = check_ok(run_script("simclr.py", "--data-dir", cifar_dir, "--batch-size", "24", "--accum-steps", "2",
                               "--out-dir", out, "--epochs", "1", "--workers", "0", "--proj-dim", "32"))
    assert "NT-Xent" in proc.stdout and "negatives come from micro-batches of 12 images" in proc.stderr
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["loss"] > 0 and "uniformity" in row and "alignment" in row and "mhe_projector" in row
    assert "tau" not in row and "mhe_predictor" not in row
    check_ok(run_script("linear_eval.py", "--checkpoint", out, "--epochs", "1", "--workers", "0", "--precompute"))
    assert json.loads((out / "linear_eval_test.json").read_text())["method"] == "simclr"
