"""Each formula against a hand computation or a slow literal reference."""
import math

import pytest
import torch

import common
from byol import byol_loss


# --- Eq. 3: BYOL loss ------------------------------------------------------------------------------------------
def test_byol_loss_closed_forms():
    z = torch.randn(5, 7)
    assert byol_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)        # identical: 2 - 2 cos 0
    assert byol_loss(z, -z).item() == pytest.approx(4.0, abs=1e-6)      # opposite: 2 - 2 cos pi
    e1, e2 = torch.eye(2)[:1], torch.eye(2)[1:]
    assert byol_loss(e1, e2).item() == pytest.approx(2.0, abs=1e-6)     # orthogonal: 2 - 2 cos pi/2


def test_byol_loss_matches_eq3_literally_and_is_scale_invariant():
    p, z = torch.randn(6, 8), torch.randn(6, 8)
    literal = sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(6)) / 6
    assert byol_loss(p, z).item() == pytest.approx(literal.item(), rel=1e-5)
    scale = torch.rand(6, 1) * 10 + 0.1
    assert byol_loss(p * scale, z * 3.0).item() == pytest.approx(literal.item(), rel=1e-5)


def test_byol_loss_stops_gradient_into_target():
    p, z = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


# --- Appendix B.2: EMA schedule, LR schedule ------------------------------------------------------------------
def test_ema_tau():
    assert common.ema_tau(0, 100, 0.99) == pytest.approx(0.99)
    assert common.ema_tau(100, 100, 0.99) == pytest.approx(1.0)
    assert common.ema_tau(50, 100, 0.99) == pytest.approx(1 - 0.01 * 0.5)    # cos(pi/2) = 0
    k, K = 17, 80
    assert common.ema_tau(k, K, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi * k / K) + 1) / 2)
    taus = [common.ema_tau(k, K, 0.996) for k in range(K + 1)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))


def test_scaled_lr():
    """Appendix B.2, LR = LR_base x batch / 256; the linear probe's at Appendix D's defaults: 0.2 x 100 / 256."""
    assert common.scaled_lr(1.5, 1024) == 6.0 and common.scaled_lr(0.3, 256) == 0.3
    assert common.scaled_lr(0.2, 100) == pytest.approx(0.078125)


def test_lr_warmup_then_cosine():
    peak, warm, total = 1.5 * 1024 / 256, 10, 110
    assert common.lr_at(0, total, warm, peak) == 0.0
    assert common.lr_at(5, total, warm, peak) == pytest.approx(peak * 5 / 10)
    assert common.lr_at(10, total, warm, peak) == pytest.approx(peak)
    assert common.lr_at(60, total, warm, peak) == pytest.approx(peak / 2)           # half-way through the cosine
    assert common.lr_at(35, total, warm, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert common.lr_at(110, total, warm, peak) == pytest.approx(0.0, abs=1e-12)


# --- Appendix B.2: LARS ------------------------------------------------------------------------------------------
def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)     # a weight: weight decay and trust ratio
    b = torch.randn(4, requires_grad=True)        # a bias / BN parameter: plain momentum SGD, no decay
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(4, 3), torch.randn(4)
    lr, wd, m, eta = 0.5, 0.1, 0.9, 1e-3
    opt = common.LARS([w, b], lr=lr, weight_decay=wd, momentum=m, trust_coefficient=eta)

    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    u = gw + wd * w0
    v_w = lr * eta * w0.norm() / u.norm() * u
    v_b = lr * gb
    assert torch.allclose(w.detach(), w0 - v_w, atol=1e-7)
    assert torch.allclose(b.detach(), b0 - v_b, atol=1e-7)

    # second step: momentum accumulates
    w1, b1 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    u = gw + wd * w1
    v_w = m * v_w + lr * eta * w1.norm() / u.norm() * u
    v_b = m * v_b + lr * gb
    assert torch.allclose(w.detach(), w1 - v_w, atol=1e-7)
    assert torch.allclose(b.detach(), b1 - v_b, atol=1e-7)


def test_lars_zero_weight_gets_trust_ratio_one():
    w = torch.zeros(2, 3, requires_grad=True)
    opt = common.LARS([w], lr=0.5, weight_decay=0.1, momentum=0.9)
    w.grad = torch.ones(2, 3)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((2, 3), -0.5))  # ||w|| = 0: plain step lr * g


def test_lars_excludes_batchnorm_by_ndim():
    bn = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.fill_(2.0)
    w0 = bn.weight.detach().clone()
    opt = common.LARS(bn.parameters(), lr=1.0, weight_decay=10.0)
    bn.weight.grad, bn.bias.grad = torch.zeros(3), torch.zeros(3)
    opt.step()
    assert torch.equal(bn.weight.detach(), w0)  # zero gradient and no weight decay -> unchanged


# --- weighted k-NN -------------------------------------------------------------------------------------------------
def test_knn_predict_matches_naive_loop():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(30, 5), dim=1)
    labels = torch.randint(0, 4, (30,))
    queries = torch.nn.functional.normalize(torch.randn(7, 5), dim=1)
    k, t = 6, 0.1
    scores = common.knn_predict(bank, labels, queries, 4, k, t)
    for q in range(7):
        sims = [(float(queries[q] @ bank[i]), i) for i in range(30)]
        expect = torch.zeros(4)
        for s, i in sorted(sims, reverse=True)[:k]:
            expect[labels[i]] += math.exp(s / t)
        assert torch.allclose(scores[q], expect, rtol=1e-5)


def test_top_k_accuracy_by_hand():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.2, 0.5, 0.3]])
    labels = torch.tensor([0, 0, 1, 2])  # right, wrong (label ranked 3rd), right, wrong (label ranked 2nd)
    assert common.accuracy(scores, labels, 1) == 50.0
    assert common.accuracy(scores, labels, 2) == 75.0
    assert common.accuracy(scores, labels, 5) == 100.0      # k beyond the number of classes


# --- Appendix B.4 split --------------------------------------------------------------------------------------------
def test_holdout_split_is_fixed_and_per_class():
    targets = [i % 10 for i in range(1000)]
    train, val = common.holdout_split(targets, per_class=5)
    assert len(val) == 50 and len(train) == 950 and not set(train) & set(val)
    assert all(sum(1 for i in val if targets[i] == c) == 5 for c in range(10))
    assert common.holdout_split(targets, per_class=5) == (train, val)     # same in every run
    _, val10 = common.holdout_split(targets, per_class=0)                 # 10 % of each class
    assert len(val10) == 100
