"""Speed benchmark (not collected by pytest). Prints JSON:

  augmentation  views/s of the batched augmentation (batched_views.batched_view) and of torchvision's per-image pipeline
                (common.ssl_augmentation) on the same machine, and their ratio
  training      per method: one optimizer step through the real pipeline (uint8 CIFAR-shaped data on the device,
                every view (two; M for msbreg) made by batched_view, forward, backward, LARS, EMA): images/s,
                seconds per 50k-image epoch, peak memory, and the achieved TFLOP/s (FLOPs of one step counted by
                torch.utils.flop_counter, over the measured step time); on a known GPU also its share of the peak
  mhe           the Eq. 7 regulariser's forward+backward alone, its share of a BYOL-MHE step, BYOL-MHE / BYOL

    python tests/bench_speed.py --device cpu --batch-size 256 --steps 1
    python tests/bench_speed.py --device cuda --batch-size 1024
"""
import argparse
import contextlib
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode  # `import torch` alone does not load torch.utils.flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import byol  # noqa: E402
import byol_mhe  # noqa: E402
import byol_uniformity  # noqa: E402
import common  # noqa: E402
import loop  # noqa: E402
from support import batched_views  # noqa: E402
import msbreg  # noqa: E402
import sfrik  # noqa: E402
import simclr  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the utilisation figure
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0}


def result_device(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up (and compilation)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def augmentation_speed(n_images, batch, device):
    """Both BYOL views of n_images CIFAR-shaped images, batched on `device` vs per image with torchvision."""
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    views = byol.VIEWS
    pil = [Image.fromarray(a) for a in arrays]
    view1, view2 = (common.ssl_augmentation("cifar10", 32, *v) for v in views)   # torchvision, image by image
    t0 = time.perf_counter()
    for img in pil:
        view1(img), view2(img)
    per_image_s = time.perf_counter() - t0
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous().to(device)

    def batched():
        g = torch.Generator(device).manual_seed(0)
        for x in images.split(batch):
            for v in views:
                batched_views.batched_view(x, "cifar10", 32, *v, g=g)
    batched_s = timed(batched, device, 1)
    out = {"images": n_images, "batch": batch, "per_image_views_per_s": round(2 * n_images / per_image_s, 1),
           "batched_views_per_s": round(2 * n_images / batched_s, 1)}
    out["ratio"] = round(out["batched_views_per_s"] / out["per_image_views_per_s"], 2)
    return out


def method_setups(names, encoder, pow="a2", hidden_dim=4096, proj_dim=256, simclr_proj_dim=128,
                  views=msbreg.VIEWS, expander=None):
    """(name, model, loss_fn, after_step, views) for each method, built by the methods' own code with their CIFAR-10
    settings, read from their parsers and presets. encoder() -> (module, feature size); the widths are the heads';
    `views` is msbreg's M; `expander` SFRIK's widths (default: its preset's 8192-8192-8192)."""
    cifar = ["--dataset", "cifar10"]
    uniformity = byol_uniformity.build_parser().parse_args(cifar)
    mhe = byol_mhe.build_parser().parse_args(cifar + ["--pow", pow])
    mhe.mhe_weight = byol_mhe.MHE_WEIGHT["cifar10"]  # Appendix C.1, the default byol_mhe.main fills in
    byol_terms = {"byol": None, "byol_uniformity": byol_uniformity.uniformity_term(uniformity),
                  "byol_mhe": byol_mhe.mhe_term(mhe)}
    ms = msbreg.build_parser().parse_args(cifar + ["--views", str(views)])
    tau, simclr_cifar = byol.PRESETS["cifar10"][300]["tau_base"], simclr.PRESETS["cifar10"][300]
    for name in names:
        torch.manual_seed(0)
        if name == "simclr":
            yield (name, simclr.SimCLR(*encoder(), simclr_proj_dim),
                   lambda m, a, b: (simclr.nt_xent(*m(a, b), simclr_cifar["temperature"]), {}), None,
                   simclr.views(simclr_cifar["jitter_strength"]))
        elif name == "msbreg":
            yield (name, msbreg.MSBReg(*encoder(), hidden_dim, proj_dim),
                   lambda m, *x: msbreg.loss_terms(m, x, ms.sv_weight, ms.brownian_weight),
                   lambda m: m.update_target(tau), msbreg.view_specs(ms.views))
        elif name == "sfrik":
            s = sfrik.parse_args(cifar)
            yield (name, sfrik.SFRIK(*encoder(), expander or s.expander), sfrik.loss_terms(s), None,
                   sfrik.VIEWS["cifar10"])
        else:
            extra = byol_terms[name]
            yield (name, byol.BYOL(*encoder(), hidden_dim, proj_dim),
                   lambda m, a, b, extra=extra: byol.loss_terms(m, a, b, extra), lambda m: m.update_target(tau),
                   byol.VIEWS)


def training_speed(args, device):
    b = args.batch_size
    images = torch.randint(0, 256, (b * (args.steps + 1), 3, 32, 32), dtype=torch.uint8).to(device)
    sampler = common.EpochBatches(len(images), b, args.steps + 1, 1, seed=0)
    results, models = {}, {}
    encoder = lambda: common.build_encoder(args.arch, "cifar")  # noqa: E731
    for name, model, loss_fn, after, views in method_setups(args.methods.split(","), encoder, args.pow,
                                                            views=args.views, expander=args.expander):
        common.place(model, device, args.compile)
        opt = common.LARS([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=1e-6)
        loader = batched_views.DeviceViews(images, sampler, "cifar10", 32, views)
        batches = iter(loader)

        def step():
            loop.train_step(model, opt, loss_fn, batches, 1, device)
            if after:
                after(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = timed(step, device, args.steps)
        r = {"step_s": round(sec, 4), "images_per_s": round(b / sec, 1), "epoch_50k_s": round(50000 / (b / sec), 2)}
        if device.type == "cuda":
            r["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:
            r["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        sampler.set_epoch(1)
        batches = iter(loader)
        # one more (untimed) step, counting its FLOPs; eager, because compiled kernels bypass the counter
        eager = torch.compiler.set_stance("force_eager") if args.compile else contextlib.nullcontext()
        with eager, FlopCounterMode(display=False) as counter:
            step()
        r["tflop_per_step"] = round(counter.get_total_flops() / 1e12, 4)
        r["tflops"] = round(r["tflop_per_step"] / sec, 3)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in result_device(device)), None)
        if peak:
            r["fraction_of_bf16_peak"] = round(r["tflops"] / peak, 3)
        results[name] = r
        models[name] = (model, opt)
        sampler.set_epoch(0)
    return results, models


def mhe_share(args, device, results, models):
    if "byol_mhe" not in models:
        return {}
    model, opt = models["byol_mhe"]

    def regulariser():
        byol_mhe.mhe_regulariser(model, ("projector", "predictor"), args.pow).backward()
        opt.zero_grad(set_to_none=True)
    reg = timed(regulariser, device, args.mhe_repeats)
    out = {"regulariser_s": round(reg, 4), "share_of_byol_mhe_step": round(reg / results["byol_mhe"]["step_s"], 4)}
    if "byol" in results:
        out["byol_mhe_over_byol"] = round(results["byol_mhe"]["step_s"] / results["byol"]["step_s"], 4)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per method (after one warm-up)")
    p.add_argument("--arch", default="resnet18", choices=tuple(common.ARCHS))
    p.add_argument("--pow", default="a2", choices=common.MHE_POWERS)
    p.add_argument("--mhe-repeats", type=int, default=5, help="timed runs of the Eq. 7 regulariser alone")
    p.add_argument("--methods", default="byol,byol_uniformity,byol_mhe,simclr,msbreg,sfrik")
    p.add_argument("--views", type=int, default=msbreg.VIEWS, help="M, views per image of msbreg")
    p.add_argument("--expander", type=sfrik.expander_widths, default=None,
                   help="SFRIK's expander widths (default: its CIFAR-10 preset, 8192-8192-8192)")
    p.add_argument("--augment-images", type=int, default=2048, help="images for the augmentation comparison")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: augmentation,training")
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    result = {"device": result_device(device),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "arch": args.arch, "compile": args.compile}
    if "augmentation" not in args.skip:
        result["augmentation"] = augmentation_speed(args.augment_images, args.batch_size, device)
        print(json.dumps(result["augmentation"]), file=sys.stderr)
    if "training" not in args.skip:
        result["training"], models = training_speed(args, device)
        result["mhe"] = mhe_share(args, device, result["training"], models)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
