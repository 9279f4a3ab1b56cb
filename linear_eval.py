"""Linear evaluation (Section 4, Appendix D) and weighted k-NN of a frozen encoder from any method's checkpoint.

    python linear_eval.py --checkpoint runs/RUN/last.pt                    # 80 epochs, augmented, as the paper
    python linear_eval.py --checkpoint runs/RUN/last.pt --precompute       # fast: probe on fixed features
    python linear_eval.py --random-init --dataset cifar10 --arch resnet18  # baseline: untrained encoder

RUN is the name of the run folder (runs/<method>-<dataset>-<time>, or the --out-dir given to the training script).

Prints and writes top-1, top-5 (Appendix B.4) and k-NN top-1 to <checkpoint folder>/linear_eval_<split>.json; an
earlier result is never replaced: the next is linear_eval_<split>-2.json, -3, ... (and the script says so).
The encoder stays in eval mode and is checked bit-identical (weights and BatchNorm buffers) after the probe.
"""
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import common
from support import batched_views, cli, runs
from support.errors import out_of_memory


def build_parser():
    p = cli.Parser(description=__doc__, formatter_class=cli.HelpFormatter,
                   parents=[cli.data_parent(), cli.run_parent()],
                   epilog="--dataset, --data-dir and --image-size default to the checkpoint's (its data dir only if it "
                          "exists, else ./data; with --random-init: --dataset is required, the others are the "
                          "dataset's)")
    p.set_defaults(dataset=None, data_dir=None)  # the checkpoint's
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="last.pt of any method (or its run folder)")
    src.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised encoder")
    p.add_argument("--arch", choices=tuple(common.ARCHS), default="resnet18", help="with --random-init only")
    p.add_argument("--stem", choices=("auto", "cifar", "imagenet"), default="auto", help="with --random-init only")
    p.add_argument("--no-zero-init-residual", dest="zero_init_residual", action="store_false",
                   help="with --random-init only: each residual block's last BatchNorm scale at one (the first "
                        "author's network) instead of zero (official BYOL's, our training default)")
    g = p.add_argument_group("linear probe (Appendix D)")
    g.add_argument("--epochs", type=cli.positive_int, default=80, help="ft_epochs, Appendix D")
    g.add_argument("--batch-size", type=cli.positive_int, default=100, help="ft_batch_size, Appendix D")
    g.add_argument("--lr", type=cli.positive_float, default=0.2,
                   help="base LR (Appendix D's ft_learning_rate); the probe's LR is lr x batch-size / 256 (0.078 "
                        "at the defaults), with a cosine decay to 0")
    g.add_argument("--momentum", type=cli.unit_interval, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=cli.non_negative_float, default=0.0, help="ft_weight_decay, Appendix D")
    g.add_argument("--precompute", action="store_true",
                   help="fast mode: features of the un-augmented images computed once, the probe trained on them "
                        "(no random crop/flip)")
    g.add_argument("--out", default=None, help="JSON result file (default: next to the checkpoint); if it exists, "
                   "the result goes to <name>-2.json, -3, ...")
    return p


def frozen_encoder(args):
    """The encoder to evaluate and the settings it was trained with."""
    if args.random_init:
        if args.dataset is None:
            raise common.UserError("--random-init needs --dataset")
        torch.manual_seed(args.seed)
        trained = {"dataset": args.dataset, "data_dir": "./data", "arch": args.arch, "stem": args.stem,
                   "zero_init_residual": args.zero_init_residual,
                   "image_size": common.DATASETS[args.dataset].image_size, "method": "random-init"}
        encoder, dim = common.encoder_for(trained)
    else:
        ckpt = runs.load_checkpoint(args.checkpoint)
        check_trained_settings(ckpt.get("args"), runs.checkpoint_path(args.checkpoint))
        encoder, dim = common.encoder_from_checkpoint(ckpt, runs.checkpoint_path(args.checkpoint))
        trained = {**ckpt["args"], "checkpoint_epoch": ckpt["epoch"]}  # the epoch the encoder was saved after
    return encoder.requires_grad_(False).eval(), dim, trained


USED = ("arch", "stem", "dataset", "data_dir", "image_size", "epochs")  # the settings of a checkpoint read here


def check_trained_settings(saved, path):
    """The settings the encoder is rebuilt and evaluated from, through the checks of the training scripts' command
    line (those it does not use are left to --resume)."""
    cli.check_saved_settings(cli.base_parser(), saved, path, only={*USED, "batchnorm", "eval_split"})
    missing = [k for k in USED if k not in saved]
    if missing:
        raise common.UserError(f"{path} holds no {missing[0]} setting")


def data_folder(args, trained):
    """(data_dir, where it comes from): --data-dir; else the checkpoint's data_dir, but only if it exists (a path
    read from a file is never created nor downloaded into); else the default ./data."""
    if args.data_dir is not None:
        return args.data_dir, "--data-dir"
    if args.random_init:
        return "./data", "the default"
    if Path(trained["data_dir"]).is_dir():
        return trained["data_dir"], "the checkpoint's data_dir"
    return "./data", f"the default; the checkpoint's data_dir {trained['data_dir']} does not exist"


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def sanity_check(module, before):
    """The probe must not change the frozen encoder: every weight and BatchNorm buffer bit-identical."""
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v.cpu(), before[k].cpu())]
    if changed:
        raise RuntimeError(f"the frozen encoder changed during linear evaluation: {changed[:5]}")


def train_probe(probe, loader, encode, lr, args, device):
    """SGD with momentum and a per-step cosine LR from lr to 0 (Appendix D), cross-entropy on encode(x).

    A diverged probe stops the evaluation (UserError, no result reported): an epoch's mean loss, or the trained
    probe's loss on the last batch, that is not finite or above 10 times the loss of the first step (our threshold:
    SGD from a fresh probe never gets there). The last check sees the last update, which no epoch's loss does (with
    one step, no update at all)."""
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    total, step, first = args.epochs * len(loader), 0, None

    def check(value, where):
        if not math.isfinite(first):  # before any update: the features themselves
            raise common.UserError(f"the linear probe's loss is {first:.4g} at its first step, before any update: the "
                                   f"encoder's features are not finite; no result was written")
        if not math.isfinite(value) or value > 10 * first:
            raise common.UserError(f"the linear probe diverged (loss {value:.4g} {where}, {first:.4g} at its first "
                                   f"step): lower --lr ({args.lr}); no result was written")

    for epoch in tqdm(range(args.epochs), desc="linear probe", dynamic_ncols=True, mininterval=1.0):
        epoch_loss = 0.0
        for x, y in loader:
            for group in opt.param_groups:
                group["lr"] = common.lr_at(step, total, 0, lr)
            loss = F.cross_entropy(probe(encode(x)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            first = loss.item() if first is None else first
            epoch_loss = epoch_loss + loss.detach()
        check((epoch_loss / len(loader)).item(), f"on average in epoch {epoch + 1}")
    with torch.no_grad():
        check(F.cross_entropy(probe(encode(x)), y.to(device)).item(), "on the last batch after training")
    return loss.item()


def result_path(args, dataset):
    """Where the result is meant to go; checked (a file we can write) before any work."""
    if args.out:
        path = Path(args.out)
        if path.is_dir():
            raise common.UserError(f"--out {path} is a folder; give a file name, e.g. {path / 'result.json'}")
    elif args.checkpoint:
        path = runs.checkpoint_path(args.checkpoint).parent / f"linear_eval_{args.eval_split}.json"
    else:
        path = Path("runs") / f"random-init-{dataset}-{args.arch}" / f"linear_eval_{args.eval_split}.json"
    runs.check_writable(path.parent, "the result folder")
    return path


def unused_path(path):
    """`path`, or, when it exists, the first of <stem>-2<suffix>, -3, ... that does not: a result is never replaced."""
    n, free = 1, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return free


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)  # every number checked against its kind
    ignored = sorted(cli.given_flags(parser, argv) & {"arch", "stem", "zero_init_residual"})
    if args.checkpoint and ignored:  # the checkpoint says which encoder it holds
        options = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
        raise common.UserError(f"{', '.join(options[k] for k in ignored)} cannot be given with --checkpoint (only "
                               f"with --random-init): the checkpoint's own encoder is evaluated")
    device = common.resolve_device(args.device)
    encoder, dim, trained = frozen_encoder(args)
    dataset = args.dataset or trained["dataset"]
    out = result_path(args, dataset)
    cli.check_augment(args.augment, dataset)
    if dataset != trained["dataset"] and args.image_size is None:
        image_size = common.DATASETS[dataset].image_size
    else:
        image_size = args.image_size or trained["image_size"]
    data_dir, data_from = data_folder(args, trained)
    data = common.load_data(dataset, data_dir, args.eval_split, args.subset)
    if args.eval_split == "val" and trained.get("eval_split") == "test":
        print("# note: the encoder was pre-trained on the full train set, which includes the val images (unlabelled)")

    common.place(encoder, device)
    before = snapshot(encoder)
    torch.manual_seed(args.seed)
    probe = nn.Linear(dim, data.num_classes).to(device)
    on_device = batched_views.use_device_data(args.augment, dataset)
    bank_loader, eval_loader = batched_views.eval_loaders(data, dataset, image_size, 512, args.workers,
                                                   device if on_device else None)
    t0 = time.time()
    effective_lr = common.scaled_lr(args.lr, args.batch_size)
    of = "a random encoder" if args.random_init else \
        f"{args.checkpoint} (epoch {trained['checkpoint_epoch']} of {trained['epochs']})"
    print(f"# linear evaluation of {of} on {dataset} ({args.eval_split}), "
          f"{len(data.bank)} train / {len(data.eval)} eval images from {data_dir} ({data_from}), {args.epochs} "
          f"epochs, batch {args.batch_size}, "
          f"LR {args.lr} x {args.batch_size} / 256 = {effective_lr:.4g}"
          + (", precomputed features" if args.precompute else ""))

    # One pass over each split: the eval transform is deterministic, so these are the features the probe sees at
    # test time, and (with --precompute) its training set.
    with out_of_memory(lambda: "extracting features: lower --image-size"):
        bank, bank_labels = common.extract_features(encoder, bank_loader, device, normalize=False)
        queries, labels = common.extract_features(encoder, eval_loader, device, normalize=False)
    knn = common.knn_predict(F.normalize(bank, dim=1), bank_labels, F.normalize(queries, dim=1), data.num_classes,
                             args.knn_k, args.knn_t)
    knn_top1 = common.accuracy(knn, labels, 1)

    def encode_images(x):
        with torch.no_grad():
            return common.encode(encoder, x, device)

    g = torch.Generator().manual_seed(args.seed)
    encode = encode_images
    if args.precompute:  # the probe's inputs are the features themselves
        loader = DataLoader(TensorDataset(bank, bank_labels), batch_size=args.batch_size, shuffle=True, generator=g)
        encode = torch.nn.Identity()
    elif on_device:  # random crop + flip per image, on the device
        loader = batched_views.DeviceBatches(data.bank, dataset, image_size, args.batch_size, device, seed=args.seed)
    else:
        loader = DataLoader(common.Transformed(data.bank, common.probe_transform(dataset, image_size)),
                            batch_size=args.batch_size, shuffle=True, generator=g, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
    with out_of_memory(lambda: "training the probe: lower --batch-size or use --precompute"):
        with common.eval_mode(encoder), torch.enable_grad():
            last_loss = train_probe(probe, loader, encode, effective_lr, args, device)
    with torch.no_grad():
        logits = probe(queries)
    sanity_check(encoder, before)

    result = {"checkpoint": args.checkpoint, "checkpoint_epoch": trained.get("checkpoint_epoch"),
              "method": trained.get("method"), "dataset": dataset,
              "zero_init_residual": trained.get("zero_init_residual", True),
              "eval_split": args.eval_split, "top1": common.accuracy(logits, labels, 1),
              "top5": common.accuracy(logits, labels, 5),
              "knn_top1": knn_top1, "knn_k": args.knn_k, "knn_t": args.knn_t, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "effective_lr": effective_lr,
              "precompute": args.precompute,
              "final_train_loss": last_loss, "encoder_unchanged": True, "seconds": round(time.time() - t0, 1)}
    free = unused_path(out)
    if free != out:
        print(f"# {out} holds an earlier result, kept; this one goes to {free.name}")
    with runs.writing(free):
        free.parent.mkdir(parents=True, exist_ok=True)
        with open(free, "x") as f:  # "x": never replaces a file, even one written meanwhile
            f.write(json.dumps(result, indent=2) + "\n")
    out = free
    print(f"top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  knn_top1 {knn_top1:.2f}  -> {out}")
    return 0


if __name__ == "__main__":
    common.cli(main)
