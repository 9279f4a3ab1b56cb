"""The training step as it runs on CUDA, checked on the CPU (CI has no GPU).

On CUDA a step must never wait for the host: no value read back from the device (.item(), nonzero, boolean
masks...), no tensor built on the host and copied over. And it runs under bf16 autocast with channels_last
tensors, where the losses and the measures of the paper must stay float32 and close to their float32 values."""
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench_speed
import byol
import common
import loop
from support import batched_views
import sfrik
import simclr
from conftest import TinyEncoder

CPU = torch.device("cpu")
# aten ops whose result the host must wait for (their output's value or shape depends on the device's data)
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "masked_scatter", "unique", "_unique", "_unique2",
              "unique_dim", "unique_consecutive", "equal", "is_nonzero", "bincount", "histc", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """Records every op that would make the host wait for the device, and indexing by a boolean mask."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS or (name in ("index", "index_put_", "index_put") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None)):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def setup(name):
    """(name, model, loss_fn, after_step, views) of one method, as the benchmark builds it, with a tiny encoder."""
    return next(bench_speed.method_setups([name], lambda: (TinyEncoder(), 16), hidden_dim=64, proj_dim=32,
                                          simclr_proj_dim=8, expander=(64, 64, 32)))


@pytest.mark.parametrize("name", ["byol", "byol_uniformity", "byol_mhe", "simclr", "sfrik"])
def test_a_step_never_waits_for_the_device(name, monkeypatch):
    """Both views made from uint8 images, forward, backward, LARS, EMA: run with the CUDA choices (colour jitter on
    the whole batch) while the default device is 'meta', so any tensor built without an explicit device (a host
    tensor on CUDA) fails to mix with the real ones, and while every host read is recorded."""
    _, model, loss_fn, after, views = setup(name)
    monkeypatch.setattr(batched_views, "colour_jitter", functools.partial(batched_views.colour_jitter, whole_batch=True))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    opt = common.LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
    g = torch.Generator().manual_seed(0)

    def step():
        batches = iter([tuple(batched_views.batched_view(images, "cifar10", 32, *v, g=g) for v in views)])
        totals = loop.train_step(model, opt, loss_fn, batches, 1, CPU)
        if after:
            after(model)
        return totals

    step()  # the first step creates LARS's momentum buffers and the cached constants
    with torch.device("meta"), HostReads() as reads:
        totals = step()
    assert reads.ops == []
    assert all(v.device == CPU for v in totals.values())


def test_the_check_catches_host_reads_and_host_tensors():
    """The two checks above can fail: the CPU's colour-jitter path picks images with nonzero(), and a tensor made
    without a device (as simclr.nt_xent once built its positives) lands on 'meta'."""
    x = torch.rand(4, 3, 8, 8)
    p = batched_views.view_params(4, 8, 8, 0.0, 0.0, torch.Generator().manual_seed(0))
    with HostReads() as reads:
        batched_views.colour_jitter(x, p["factors"], p["order"], p["jitter"], whole_batch=False)
        x[x > 0.5].sum().item()
    assert {"nonzero", "index", "_local_scalar_dense"} <= set(reads.ops)
    with torch.device("meta"), pytest.raises(RuntimeError):
        x + torch.arange(8)


def bf16():
    """CUDA's autocast (common.autocast), here on the CPU."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_losses_and_measures_leave_autocast():
    """Each loss and measure computed inside bf16 autocast from float32 inputs is the float32 computation, bit for
    bit: a bf16 Gram product, exp or arccos would be too coarse for them."""
    torch.manual_seed(0)
    z1, z2, w = torch.randn(16, 32), torch.randn(16, 32), torch.randn(64, 8, 3, 3)
    cases = {"byol_loss": lambda: byol.byol_loss(z1, z2), "nt_xent": lambda: simclr.nt_xent(z1, z2, 0.5),
             "uniformity": lambda: common.uniformity_loss(z1), "alignment": lambda: common.alignment_loss(z1, z2),
             "mmd_legendre": lambda: common.mmd_to_uniform(z1), "invariance": lambda: sfrik.invariance_loss(z1, z2),
             **{f"energy_{s}": functools.partial(common.total_energy, [w, w.flatten(1)[:32], w * 2], s)
                for s in common.MHE_POWERS}}
    for name, f in cases.items():
        with bf16():
            inside = f()
        assert inside.dtype == torch.float32 and torch.equal(inside, f()), name


@pytest.mark.parametrize("name", ["byol", "byol_uniformity", "byol_mhe", "simclr", "sfrik"])
def test_a_bf16_channels_last_step_stays_close_to_float32(name, monkeypatch):
    """train_step with CUDA's settings (bf16 autocast, channels_last model and inputs) against the float32 step from
        the same weights and views: float32 terms within bf16 rounding of the float32 ones, finite float32 gradients
    pointing the same way."""
    _, model, loss_fn, _, views = setup(name)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    x1, x2 = (batched_views.batched_view(images, "cifar10", 32, *v, g=torch.Generator().manual_seed(i))
              for i, v in enumerate(views))
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def step():
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        opt = common.LARS(model.parameters(), lr=0.0)
        opt.step = opt.zero_grad = lambda *a, **k: None  # keep the weights and the gradients to compare them
        terms = loop.train_step(model, opt, loss_fn, iter([(x1, x2)]), 1, CPU)
        return terms, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    reference, ref_grads = step()
    monkeypatch.setattr(common, "autocast", lambda device: bf16())
    monkeypatch.setattr(common, "to_device", lambda x, device: x.to(memory_format=torch.channels_last))
    model.to(memory_format=torch.channels_last)
    terms, grads = step()
    assert set(terms) == set(reference) and set(grads) == set(ref_grads) and len(grads) > 10
    assert terms["loss"] != reference["loss"]  # the step did run in bf16
    for k, v in terms.items():
        assert v.dtype == torch.float32 and torch.isfinite(v)
        assert abs(v - reference[k]) <= 0.02 * abs(reference[k]) + 1e-3, (k, v, reference[k])
    for k, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), k
    flat, ref_flat = (torch.cat([g[k].flatten() for k in sorted(g)]) for g in (grads, ref_grads))
    cos = torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0)
    assert cos > 0.97  # measured 0.991-0.996: bf16 moves single small gradients by 10-30 %, not their direction
