"""Speed benchmark (not collected by pytest): time of one optimizer step per method, and the share of it spent in
the paper's regularisers. Prints JSON.

    python tests/bench_speed.py --batch-size 256 --device cpu          # what the README's CPU numbers come from
    python tests/bench_speed.py --batch-size 1024 --device cuda

Input is synthetic CIFAR-shaped data already on the device (no augmentation cost): this isolates the model step.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import byol  # noqa: E402
import byol_mhe  # noqa: E402
import common  # noqa: E402
import simclr  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def record(result, name, seconds, batch):
    result[f"{name}_step_s"] = round(seconds, 4)
    result[f"{name}_images_per_s"] = round(batch / seconds, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--arch", default="resnet18", choices=tuple(common.ARCHS))
    p.add_argument("--repeats", type=int, default=2, help="timed optimizer steps per method (after one warm-up)")
    p.add_argument("--pow", default="a2", choices=common.MHE_POWERS)
    p.add_argument("--methods", default="byol,byol_uniformity,byol_mhe,simclr",
                   help="comma-separated subset of byol,byol_uniformity,byol_mhe,simclr")
    args = p.parse_args()
    device = common.resolve_device(args.device)
    torch.manual_seed(0)
    b = args.batch_size
    x1 = common.to_device(torch.randn(b, 3, 32, 32), device)
    x2 = common.to_device(torch.randn(b, 3, 32, 32), device)
    model = byol.BYOL(*common.build_encoder(args.arch, "cifar")).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = common.LARS([q for q in model.parameters() if q.requires_grad], lr=0.1, weight_decay=1.5e-6)
    parts = ("projector", "predictor")

    terms = {
        "byol": None,
        "byol_uniformity": lambda m, out: {"uniformity": (0.125, (common.uniformity_loss(out["z1"]) +
                                                                 common.uniformity_loss(out["z2"])) / 2)},
        "byol_mhe": lambda m, out: {"mhe": (10.0, byol_mhe.mhe_regulariser(m, parts, args.pow))},
    }
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "arch": args.arch, "batch_size": b,
              "pow": args.pow, "mhe_on": ",".join(parts)}
    methods = args.methods.split(",")
    for name, extra in terms.items():
        if name not in methods:
            continue

        def step():
            common.train_step(model, opt, lambda m, a, c: byol.loss_terms(m, a, c, extra), iter([(x1, x2)]), 1,
                              device)
            model.update_target(0.99)
        record(result, name, timed(step, device, args.repeats), b)
    if "simclr" in methods:
        net = simclr.SimCLR(*common.build_encoder(args.arch, "cifar")).to(device)
        if device.type == "cuda":
            net.to(memory_format=torch.channels_last)
        sim_opt = common.LARS(net.parameters(), lr=0.1, weight_decay=1e-6)

        def simclr_step():
            common.train_step(net, sim_opt, lambda m, a, c: (simclr.nt_xent(*m(a, c), 0.5), {}), iter([(x1, x2)]),
                              1, device)
        record(result, "simclr", timed(simclr_step, device, args.repeats), b)
    if "byol_mhe" not in methods:
        print(json.dumps(result, indent=2))
        return

    def regulariser():  # Eq. 7 forward + backward alone
        with common.autocast(device):
            byol_mhe.mhe_regulariser(model, parts, args.pow).backward()
        opt.zero_grad(set_to_none=True)
    reg = timed(regulariser, device, max(5, args.repeats))
    result["mhe_regulariser_s"] = round(reg, 4)
    result["mhe_share_of_byol_mhe_step"] = round(reg / result["byol_mhe_step_s"], 4)
    if "byol_step_s" in result:
        result["byol_mhe_over_byol"] = round(result["byol_mhe_step_s"] / result["byol_step_s"], 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
