"""One process against two (torchrun, gloo, CPU) on the real ResNet-18, in float32 and in float64 (issue 18 item
16; not collected by pytest: minutes of CPU). Prints JSON, per dtype: the largest difference between the two runs'
final parameters and buffers (absolute, with the tensor it is in, and relative to that tensor's largest value), the
difference of the whole parameter vectors relative to its norm, and the largest difference of the logged losses.

Float noise amplified by training shrinks with the precision (float32's 1.2e-7 to float64's 2.2e-16, nine orders
of magnitude); a real difference between one process and two (a wrong gather, BatchNorm over another batch, other
data) does not.

    python tests/bench_float64.py                      # 16 steps: 4 epochs of 4 steps of 8 of 32 tiny images
    python tests/bench_float64.py --epochs 1 --dtypes float64 --two-process-flags=--no-sync-bn   # a control

The control gives the two processes a real difference (BatchNorm over each process's 4 images instead of the 8):
the measure must then see it in float64 too.

Each run is `python byol.py ...` (or `torchrun --nproc_per_node 2 byol.py ...`) started by a launcher that sets
torch's default dtype (parameters, buffers, random draws, constants) and makes every `.float()` of the code (the
augmentation's uint8 -> float, the losses' and the logged terms' casts) return that dtype; it checks that every view
and every loss of every step has it.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_cifar10  # noqa: E402

LAUNCHER = """
import os, runpy, sys, torch
import torchvision.datasets.cifar as c
c.check_integrity = lambda *a, **k: True  # the tiny CIFAR files have other MD5s
dtype = getattr(torch, os.environ["BENCH_DTYPE"])
torch.set_default_dtype(dtype)
torch.Tensor.float = lambda self, memory_format=torch.preserve_format: self.to(dtype, memory_format=memory_format)
import loop
real_step = loop.train_step

def train_step(model, optimizer, loss_fn, batches, accum_steps, device):
    def checked(m, *views):
        assert all(v.dtype == dtype for v in views), [v.dtype for v in views]
        loss, terms = loss_fn(m, *views)
        assert loss.dtype == dtype and all(t.dtype == dtype for t in terms.values()), loss.dtype
        return loss, terms
    return real_step(model, optimizer, checked, batches, accum_steps, device)

loop.train_step = train_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train(world, dtype, data, out, args):
    extra = args.two_process_flags.split() if world > 1 else []
    flags = ["byol.py", "--device", "cpu", "--data-dir", str(data), "--subset", str(args.images), "--batch-size",
             str(args.batch_size), "--epochs", str(args.epochs), "--warmup-epochs", "0", "--workers", "0",
             "--knn-every", "0", "--analysis-samples", "0", "--log-every", "1000", "--out-dir", str(out), *extra]
    launch = [sys.executable, "-c", LAUNCHER]
    if world > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                  "--no-python", *launch]
    env = {**os.environ, "BENCH_DTYPE": dtype, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launch, *flags], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(launch[:1] + flags)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return torch.load(out / "last.pt", weights_only=True)["model"], rows


def compare(one, two, rows_one, rows_two):
    worst, worst_relative, diffs, norms = (0.0, None, 0.0), (0.0, None), [], []
    for key, a in one.items():
        b = two[key]
        if not a.is_floating_point():
            assert torch.equal(a, b), key
            continue
        d, scale = (a - b).abs().max().item(), a.abs().max().item()
        if d > worst[0]:
            worst = (d, key, d / scale)
        if scale and d / scale > worst_relative[0]:
            worst_relative = (d / scale, key)
        diffs.append((a - b).flatten())
        norms.append(a.flatten())
    loss = max(abs(r1[k] - r2[k]) for r1, r2 in zip(rows_one, rows_two) for k in r1 if k in ("loss", "byol"))
    return {"max_abs_diff": worst[0], "in": worst[1], "relative_to_that_tensor": worst[2],
            "max_relative_diff": worst_relative[0], "relative_in": worst_relative[1],
            "vector_relative_diff": (torch.cat(diffs).norm() / torch.cat(norms).norm()).item(),
            "max_loss_diff": loss, "steps": rows_one[-1]["step"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--two-process-flags", default="", help="more flags for the 2-process run only (a control)")
    args = p.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_cifar10(Path(tmp) / "cifar")
        for dtype in args.dtypes.split(","):
            runs = [train(world, dtype, data, Path(tmp) / f"{dtype}-{world}", args) for world in (1, 2)]
            result[dtype] = compare(runs[0][0], runs[1][0], runs[0][1], runs[1][1])
            print(json.dumps({dtype: result[dtype]}), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
