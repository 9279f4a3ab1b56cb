"""Many processes (torchrun + torch.distributed), on the CPU with gloo and two processes: the global-batch maths,
a 2-process run equal to the 1-process run with the same global batch, a stop signal on one process, resuming
with another number of processes, torchrun end to end, and the bad input."""
import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision.datasets.cifar

import byol
import byol_mhe
import byol_uniformity
import common
from support import distributed, runs
import msbreg
import sfrik
import simclr
from conftest import RUNNER, ROOT, TinyEncoder
from test_training import signal_at

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, fn, args):
    """One of WORLD processes, with the environment torchrun gives its workers."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True  # our tiny CIFAR files have other MD5s
    try:
        fn(rank, *args)
    finally:
        distributed.end_distributed()


def spawn(fn, *args):
    """fn(rank, *args) in WORLD fresh processes (a free port for each call); raises what any of them raised."""
    mp.start_processes(_worker, args=(free_port(), fn, args), nprocs=WORLD, start_method="spawn")


# --- the global-batch maths: gathered Eq. 1 / Eq. 2 and BatchNorm over all processes ------------------------------
def _global_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.randn(8, 4, 3, 3, generator=g)


def _losses(x1, x2, images, lin, bn, gathered):
    """Eq. 2 on one view, Eq. 1 and SFRIK's loss on both and a per-sample loss after BatchNorm, on rows (per
    process) x1, x2."""
    z1, z2 = lin(x1), lin(x2)
    g = common.gather if gathered else (lambda z: z)
    uni = common.uniformity_loss(g(z1), 2.0)
    nce = simclr.nt_xent(g(z1), g(z2), 0.5)
    sfr = sfrik.sfrik_loss(g(z1), g(z2), 10.0, 1.0)[0]
    weights = torch.linspace(-1, 1, 4 * 9).view(1, 4, 3, 3)
    per_sample = (bn(images) * weights).flatten(1).sum(1).pow(2).mean()
    return uni, nce, sfr, per_sample


def _gather_weights():
    return torch.linspace(-1, 1, 2 * 8 * 5).view(2, 8, 5)


def _gathered_maths(rank, out):
    distributed.init_distributed(torch.device("cpu"))
    x1, x2, images = (t.chunk(WORLD)[rank].clone().requires_grad_() for t in _global_batch())
    torch.manual_seed(0)
    lin, bn = nn.Linear(5, 3), distributed.sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), torch.device("cpu"))
    assert isinstance(bn[0], distributed.GlobalBatchNorm)
    uni, nce, sfr, per_sample = _losses(x1, x2, images, lin, bn, gathered=True)
    (uni + nce + sfr + per_sample).backward()
    params = list(lin.parameters()) + list(bn.parameters())
    distributed.average_gradients(params)
    # a gradient that reaches the gather non-contiguous (here transposed) still goes back to the right rows
    pairs = torch.stack([x1, x2], dim=1).detach().requires_grad_()                   # (B / W, 2, 5)
    (common.gather(pairs).transpose(0, 1) * _gather_weights()).sum().backward()     # (2, B, 5) weights
    torch.save({"gather_grad": pairs.grad, "uni": uni.detach(), "nce": nce.detach(), "sfr": sfr.detach(),
                "per_sample": per_sample.detach(),
                "param_grads": [p.grad for p in params], "row_grads": [x1.grad, x2.grad, images.grad],
                "bn_state": bn.state_dict()}, out / f"maths{rank}.pt")


def test_gathered_terms_and_global_batchnorm_equal_the_concatenated_batch(two_processes):
    """Each process computes the global Eq. 1 / Eq. 2 on gathered rows and the mean of its per-sample losses;
    averaging the parameter gradients over the processes then gives the 1-process gradient of the concatenated
    batch, and each process's rows receive W times their share (divided away by that average)."""
    x1, x2, images = (t.clone().requires_grad_() for t in _global_batch())
    torch.manual_seed(0)
    lin, bn = nn.Linear(5, 3), nn.Sequential(nn.BatchNorm2d(4))
    uni, nce, sfr, per_sample = _losses(x1, x2, images, lin, bn, gathered=False)
    (uni + nce + sfr + per_sample).backward()
    params = list(lin.parameters()) + list(bn.parameters())
    results = [torch.load(two_processes / f"maths{r}.pt") for r in range(WORLD)]
    for r, res in enumerate(results):
        want = WORLD * _gather_weights().transpose(0, 1).chunk(WORLD)[r]   # every process's loss, summed back
        assert torch.allclose(res["gather_grad"], want, atol=1e-6)
        assert torch.allclose(res["uni"], uni, atol=1e-6) and torch.allclose(res["nce"], nce, atol=1e-6)
        assert torch.allclose(res["sfr"], sfr, atol=1e-5)
        for got, want in zip(res["param_grads"], params):
            assert torch.allclose(got, want.grad, atol=1e-5), (got, want.grad)
        for got, want in zip(res["row_grads"], (x1, x2, images)):
            assert torch.allclose(got / WORLD, want.grad.chunk(WORLD)[r], atol=1e-6)
        for (name, got), want in zip(res["bn_state"].items(), bn.state_dict().values()):
            assert torch.allclose(got.float(), want.float(), atol=1e-6), name   # running statistics
    per_sample_global = sum(res["per_sample"] for res in results) / WORLD  # the global loss: mean over processes
    assert torch.allclose(per_sample_global, per_sample, atol=1e-5)


# --- training: W = 2 equals W = 1, parameter for parameter ------------------------------------------------------
def _argv(cifar_dir, out_dir, *extra):
    """One epoch of 5 steps of 10 images on the tiny CIFAR-10; a large LR so that the parameters move visibly."""
    return ["--data-dir", str(cifar_dir), "--batch-size", "10", "--epochs", "1", "--workers", "0",
            "--proj-dim", "8", "--base-lr", "20", "--warmup-epochs", "0", "--knn-every", "0",
            "--analysis-samples", "0", "--log-every", "1", "--out-dir", str(out_dir), *extra]


def _byol_model(batchnorm):
    torch.manual_seed(0)
    return byol.BYOL(TinyEncoder(16, bn=batchnorm), 16, hidden_dim=32, proj_dim=8, batchnorm=batchnorm)


def _msbreg_model(batchnorm):
    torch.manual_seed(0)
    return msbreg.MSBReg(TinyEncoder(16, bn=batchnorm), 16, hidden_dim=32, proj_dim=8, batchnorm=batchnorm)


def _sfrik_model(batchnorm):
    torch.manual_seed(0)
    return sfrik.SFRIK(TinyEncoder(16, bn=batchnorm), 16, (32, 8), batchnorm)


def _run(method, cifar_dir, out_dir, *extra, extra_terms=None):
    """Train one of the methods with a TinyEncoder; returns (exit status, model)."""
    argv = _argv(cifar_dir, out_dir, *extra)
    batchnorm = "--no-batchnorm" not in extra
    if method == "sfrik":  # its embedding width is the expander's last
        model, at = _sfrik_model(batchnorm), argv.index("--proj-dim")
        return sfrik.train(sfrik.parse_args([*argv[:at], *argv[at + 2:], "--expander", "32-8"]), model), model
    if method == "msbreg":
        model = _msbreg_model(batchnorm)
        return msbreg.train(msbreg.parse_args(argv), model), model
    if method == "simclr":
        torch.manual_seed(0)
        model = simclr.SimCLR(TinyEncoder(16, bn=batchnorm), 16, 8, batchnorm)
        return simclr.train(simclr.parse_args(argv), model), model
    module = {"byol": byol, "byol_uniformity": byol_uniformity, "byol_mhe": byol_mhe}[method]
    parser = module.build_parser() if method != "byol" else None
    args = byol.parse_args(argv, parser, method)
    if method == "byol_uniformity":
        extra_terms = byol_uniformity.uniformity_term(args)
    if method == "byol_mhe":
        args.mhe_weight = 10.0
        extra_terms = byol_mhe.mhe_term(args)
    model = _byol_model(batchnorm)
    return byol.train(args, model, extra_terms=extra_terms), model


RUNS = {  # name: (method, flags)
    "byol": ("byol", ["--no-batchnorm"]),
    "byol_uniformity": ("byol_uniformity", ["--no-batchnorm"]),
    "byol_mhe": ("byol_mhe", ["--no-batchnorm", "--mhe-on", "encoder,projector,predictor",
                              "--augment", "per-image"]),   # DataLoader path: each process loads its part
    "simclr": ("simclr", ["--no-batchnorm"]),
    "msbreg": ("msbreg", ["--no-batchnorm"]),    # M = 4: singular values and Brownian noise of the global batch
    "sfrik": ("sfrik", ["--no-batchnorm", "--base-lr", "1"]),  # the gathered MMD; LR 1 (20 makes its steps chaotic)
    # BatchNorm everywhere, --sync-bn on by default under torchrun; with accumulation: micro-batches of 5 + 5
    "byol_sync_bn": ("byol", ["--batch-size", "20", "--accum-steps", "2"]),
    "simclr_sync_bn": ("simclr", ["--sync-bn"]),
}


def _two_processes(rank, cifar_dir, out):
    """Everything the tests below compare, in one start of WORLD processes (each start costs seconds); the
    deprecation warnings they raise are kept for test_no_deprecated_collectives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trained_in_two_processes(rank, cifar_dir, out)
    deprecated = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "deprecated" in str(w.message)]
    (out / f"deprecated.rank{rank}").write_text("\n".join(sorted(set(deprecated))))


def _trained_in_two_processes(rank, cifar_dir, out):
    _gathered_maths(rank, out)
    for name, (method, flags) in RUNS.items():
        status, model = _run(method, cifar_dir, out / name, *flags)
        assert status == 0
        torch.save(model.state_dict(), out / f"{name}.rank{rank}.pt")
    # SIGTERM on rank 1 only, during its 3rd step: both stop after step 4 (the next), one checkpoint
    status, _ = _run("byol", cifar_dir, out / "stopped", "--no-batchnorm",
                     extra_terms=signal_at(3) if rank == 1 else None)
    (out / f"stopped.rank{rank}").write_text(str(status))
    # the reverse: a 1-process run stopped by the test process, resumed here by two
    model = _byol_model(False)
    assert byol.train(byol.parse_args(["--resume", str(out / "one_stopped"), "--workers", "0"]), model) == 0
    torch.save(model.state_dict(), out / f"resumed.rank{rank}.pt")


@pytest.fixture(scope="module")
def two_processes(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
        assert _run("byol", cifar_dir, out / "one_stopped", "--no-batchnorm", extra_terms=signal_at(2))[0] == 143
    spawn(_two_processes, cifar_dir, out)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_equal_one(two_processes, cifar_dir, tmp_path, no_md5, name):
    method, flags = RUNS[name]
    status, model = _run(method, cifar_dir, tmp_path / "one", *[f for f in flags if f != "--sync-bn"])
    assert status == 0
    ranks = [torch.load(two_processes / f"{name}.rank{r}.pt") for r in range(WORLD)]
    one = model.state_dict()
    assert list(ranks[0]) == list(one)                       # same state_dict keys: checkpoints interchangeable
    # With BatchNorm, a bias that feeds a BatchNorm (the TinyEncoder's conv biases) has a zero gradient in exact
    # arithmetic: only float noise, amplified by 1/sigma of these tiny batches, moves it (~1e-5 .. 1e-4 here),
    # differently in one process and two. Every other parameter moves by 0.1 or more in these 5 steps.
    atol = 1e-5 if "--no-batchnorm" in flags else 5e-4
    moved = False
    for key, want in one.items():
        if key == "_extra_state":                               # msbreg's count of Brownian noise draws
            assert ranks[0][key] == ranks[1][key] == want
            continue
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # LARS and the EMA keep the processes identical
        assert torch.allclose(ranks[0][key].float(), want.float(), rtol=1e-4, atol=atol), key
        moved |= not torch.allclose(want.float(), _initial(method, flags)[key].float(), rtol=1e-3, atol=1e-2)
    assert moved
    assert json.loads((two_processes / name / "args.json").read_text())["sync_bn"] is None  # --sync-bn: the default
    rows = [json.loads(x) for x in (two_processes / name / "metrics.jsonl").read_text().splitlines()]
    want_rows = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == want_rows[0]["step"]
    logged = ("loss", "byol", "uniformity", "mhe", "centroid", "sv", "brownian", "invariance", "mmd")
    for key in logged:  # logged: the global batch's
        if key in want_rows[0]:
            assert rows[0][key] == pytest.approx(want_rows[0][key], rel=1e-4, abs=1e-6), key


def test_no_deprecated_collectives(two_processes):
    """torch 2.14 deprecates torch.distributed.nn.functional's all_gather and all_reduce (a warning on every step);
    the gathers and the global BatchNorm of every method above use the functional collectives instead."""
    for r in range(WORLD):
        assert (two_processes / f"deprecated.rank{r}").read_text() == ""


def _initial(method, flags):
    if method == "simclr":
        torch.manual_seed(0)
        return simclr.SimCLR(TinyEncoder(16, bn="--no-batchnorm" not in flags), 16, 8,
                             "--no-batchnorm" not in flags).state_dict()
    if method == "msbreg":
        return _msbreg_model("--no-batchnorm" not in flags).state_dict()
    if method == "sfrik":
        return _sfrik_model("--no-batchnorm" not in flags).state_dict()
    return _byol_model("--no-batchnorm" not in flags).state_dict()


def test_signal_on_one_process_stops_all_and_resumes_with_one(two_processes, cifar_dir, tmp_path, no_md5):
    """SIGTERM on rank 1 only; then W = 2 -> W' = 1, and W = 1 -> W' = 2 (resumed in the fixture)."""
    out = two_processes / "stopped"
    assert [(two_processes / f"stopped.rank{r}").read_text() for r in range(WORLD)] == [str(128 + 15)] * WORLD
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "last.pt"]   # rank 0's checkpoint only
    assert runs.load_checkpoint(out / "last.pt")["step"] == 4
    resumed = _byol_model(False)
    args = byol.parse_args(["--resume", str(out), "--workers", "0"])          # W' = 1: a plain process
    assert byol.train(args, resumed) == 0
    status, full = _run("byol", cifar_dir, tmp_path / "full", "--no-batchnorm")
    more = [torch.load(two_processes / f"resumed.rank{r}.pt") for r in range(WORLD)]
    for key, want in full.state_dict().items():
        for got in (resumed.state_dict()[key], *(m[key] for m in more)):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), key


# --- as a user runs it ------------------------------------------------------------------------------------------
def test_torchrun_end_to_end_writes_one_run_folder(cifar_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "--no-python", sys.executable, "-c", RUNNER, str(ROOT / "byol.py"), "--device", "cpu",
           "--data-dir", str(cifar_dir), "--subset", "16", "--batch-size", "8", "--epochs", "1", "--workers", "0",
           "--hidden-dim", "64", "--proj-dim", "32", "--analysis-samples", "8", "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deprecated" not in proc.stderr, proc.stderr[-3000:]   # the global BatchNorm's sums
    assert proc.stdout.count("objective: L = L_BYOL") == 1 and proc.stdout.count("done: ") == 1  # rank 0 only
    assert "# 2 processes (gloo): 4 images each per micro-batch, BatchNorm over all processes" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "encoder.pt", "last.pt", "metrics.jsonl"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 2 and 0 <= rows[0]["knn_top1"] <= 100
    ckpt = runs.load_checkpoint(out)
    assert ckpt["args"]["batch_size"] == 8 and ckpt["args"]["sync_bn"] is None
    assert not any("module." in k for k in ckpt["model"])


def torchrun(*argv, env=(), timeout=300):
    """`torchrun --nproc_per_node WORLD python argv` as a user starts it; on a timeout torchrun is sent SIGTERM,
    which it forwards to its processes (each in a session of its own) before killing them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "--no-python", sys.executable, *map(str, argv)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.communicate(timeout=60)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# RUNNER with a TinyEncoder in place of the ResNet (the launch and the stop are what is tested) and, with STOP_AT=k,
# SIGTERM sent to the torchrun launcher during step k, as a scheduler pre-empting the job does: once every process
# is inside step k (a barrier), rank 1 signals its parent, torchrun forwards the signal to every process, and each
# waits inside step k until it has received it (handled by the script's own handler).
TINY_RUNNER = """
import os, signal, sys, time
sys.path.insert(0, "tests")
import torch, torch.distributed as dist
import common, loop
from conftest import TinyEncoder
common.encoder_for = lambda args: (TinyEncoder(16), 16)
stop_at, real_step, calls = int(os.environ.get("STOP_AT", 0)), loop.train_step, []

def train_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == stop_at:
        handler, got = signal.getsignal(signal.SIGTERM), []
        signal.signal(signal.SIGTERM, lambda n, frame: (got.append(n), handler(n, frame)))
        dist.barrier()
        if dist.get_rank() == 1:
            os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.time() + 60
        while not got and time.time() < deadline:
            time.sleep(0.01)
        signal.signal(signal.SIGTERM, handler)
    return real_step(*args, **kwargs)

loop.train_step = train_step
torch.set_num_threads(1)
""" + RUNNER


def test_torchrun_sigterm_far_from_an_agreement_point_saves_the_next_step(cifar_dir, tmp_path, no_md5, capsys):
    """Issue 18.5: torchrun kills its processes 30 s after forwarding a SIGTERM; they used to agree on a stop only
    every --log-every steps and at an epoch's end, so a signal far from both lost the checkpoint. Now every
    process stops after the step following the signal, with one checkpoint, and the run resumes."""
    out = tmp_path / "run"
    flags = ["byol.py", "--device", "cpu", "--data-dir", cifar_dir, "--batch-size", "4", "--epochs", "1",
             "--workers", "0", "--hidden-dim", "32", "--proj-dim", "8", "--knn-every", "0", "--analysis-samples",
             "0", "--out-dir", out]
    proc = torchrun("-c", TINY_RUNNER, *flags, "--log-every", "1000", env={"STOP_AT": "3"})  # 12 steps an epoch
    assert proc.returncode != 0                          # torchrun reports the signal it received
    err = proc.stderr
    assert "forcefully exiting" not in err, err[-3000:]  # both ended within torchrun's grace, not killed
    assert err.count("stopped by signal 15 at step 4;") == 1, err[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "last.pt"]
    assert runs.load_checkpoint(out / "last.pt")["step"] == 4
    args = byol.parse_args(["--resume", str(out)])        # as byol.py's main, here (a process costs seconds)
    assert byol.train(args, byol.build_model(args, TinyEncoder(16), 16)) == 0
    assert "at epoch 0, step 4" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [12]
    assert (out / "encoder.pt").exists()


def test_torchrun_prints_an_error_once():
    """Issue 18.11: every process meets the same bad input (as byol.py's check of --batch-size against W, made
    before the processes join); one line says so, not one per process. The first process to fail exits 2, and
    torchrun then stops the others and exits 1 with its own summary of the failed processes. (A script importing
    only support.errors: the launcher and its two processes cost seconds each to import torch alone.)"""
    code = ("from support.errors import UserError, cli\n"
            "def main():\n    raise UserError('the bad input every process meets')\n"
            "cli(main)\n")
    proc = torchrun("-c", code)
    assert proc.stderr.count("error: the bad input every process meets\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("error:") == 1, proc.stderr[-3000:]
    # torchrun's summary: the first process to exit (2), and the other, which it may have stopped first (-15)
    assert proc.returncode == 1 and "ChildFailedError" in proc.stderr and "exitcode  : 2" in proc.stderr


def test_an_error_line_is_printed_by_the_first_process_that_meets_it(monkeypatch, capsys):
    """The counter in torchrun's store (here a store of our own): a line another process printed is not printed
    again; a process failing alone, with its own line, prints it; outside torchrun every line is printed."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("WORLD_SIZE", "2")

    def fails(message):
        def main():
            raise common.UserError(message)
        with pytest.raises(SystemExit) as exit:
            common.cli(main)
        assert exit.value.code == 2
        return capsys.readouterr().err

    assert fails("the same bad input") == "error: the same bad input\n"   # the first process
    assert fails("the same bad input") == ""                                # every other one
    assert fails("process 1 of this machine has no GPU") == "error: process 1 of this machine has no GPU\n"
    monkeypatch.setenv("MASTER_PORT", str(free_port()))                    # no store: better twice than never
    assert fails("the same bad input") == "error: the same bad input\n"
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")                     # not torchrun
    assert fails("the same bad input") == "error: the same bad input\n"


@pytest.mark.parametrize("env,flags,text", [
    ({"WORLD_SIZE": "3", "RANK": "0"}, ["--batch-size", "16"], "3 processes cannot share equally"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, ["--batch-size", "18", "--accum-steps", "6"], "2 processes cannot share"),
    ({}, ["--sync-bn"], "--sync-bn needs torchrun"),
    ({"WORLD_SIZE": "4", "RANK": "0"}, ["--batch-size", "4", "--no-sync-bn"], "BatchNorm needs at least 2"),
])
def test_bad_distributed_input(cifar_dir, tmp_path, monkeypatch, capsys, env, flags, text):
    """Through common.cli in this process, as the scripts run main(); the checks come before joining the process
    group (which would wait for the other processes torchrun's variables promise)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exit:
        common.cli(lambda: byol.main(["--data-dir", str(cifar_dir), "--workers", "0", "--out-dir",
                                      str(tmp_path / "run"), *flags]))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and text in err, err
    assert not (tmp_path / "run").exists()


def test_results_tables_take_torchrun_runs_with_global_batchnorm():
    """args.json of a torchrun run holds sync_bn None (also after --sync-bn) or False; results.py matches the first
    to the paper's rows and keeps a --no-sync-bn run apart."""
    import results
    preset = results.preset_args("byol", "cifar10", 300)
    assert preset["sync_bn"] is None and results.settings(dict(preset)) == ()
    assert results.settings({**preset, "sync_bn": False}) == (("sync_bn", False),)
