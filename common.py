"""What every method of the paper needs, written once.

Durrant & Leontidis, "Hyperspherically Regularized Networks for Self-Supervision" (2022). The method files
(byol.py, byol_uniformity.py, byol_mhe.py, simclr.py, sfrik.py, msbreg.py) import this module and add only their
own model and loss.

Sections, in the order the paper introduces them:
  errors and the command line    one-line errors, the shared flags and the kinds of their numbers (NUMBERS), presets
                                 keyed by (dataset, epochs), what may change on --resume
  data                           Appendix B.3/B.4: datasets and the fixed held-out validation splits
  augmentations                  Appendix B.5: the views of each image (torchvision), evaluation transforms
  batched augmentations          Appendix B.5 for a whole uint8 batch on its device, parameters drawn per image
  model                          Appendix B.1 / Section 3.6: ResNet encoder with the CIFAR stem, the MLP head
  optimisation                   Appendix B.2: LARS, LR warm-up + cosine, EMA schedule tau
  evaluation                     weighted k-NN monitor; uniformity (Eq. 2), SFRIK's Legendre MMD to the uniform
                                 law, alignment (Eq. A.1), hyperspherical energy (Eq. 5, A.3) and the paper's
                                 uniformity analysis (Figs. 4, 5)
  device                         CUDA or CPU, bf16 autocast and channels_last on CUDA
  checkpoints                    atomic, resumable, readable with weights_only=True; a full disk keeps the last one
  many processes                 torchrun: join the group, gather with gradients, average gradients, BatchNorm
                                 over the global batch, rank 0 alone writes
  training loop                  gradient accumulation (Section 5.1), pre-emption, out of memory, the run folder,
                                 metrics.jsonl rows that survive a resume
"""
import argparse
import contextlib
import datetime
import errno
import functools
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

CHECKPOINT_FORMAT = "hyperreg-1"


# ----------------------------------------------------------------------------------------------------------------
# Errors and the command line
# ----------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input (or a fault the user must fix): shown as one line on stderr with exit status `exit_code` (2 for bad
    input), never as a traceback.

    Raised inside a DataLoader worker, it comes back as UserError(worker traceback): only its last line is kept."""
    exit_code = 2

    def __init__(self, message, exit_code=None):
        message = str(message)
        if "Original Traceback" in message:  # re-raised by the DataLoader from a worker process
            message = message.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def cli(main):
    """Run `main()` so that bad input prints one line and exits 2 instead of a traceback."""
    try:
        sys.exit(main())
    except UserError as e:
        end_workers()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # outside the training loop (which saves and exits on its own)
        end_workers()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        end_distributed()


def end_workers():
    """Kill this script's DataLoader workers left by an error. They ignore SIGTERM (_workers_ignore_signals), and
    the interpreter's exit ends them with SIGTERM and then waits for them: it would wait forever."""
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()


# Every numeric flag of every script is checked in one place, Parser.parse_args, before anything is loaded or
# written. NUMBERS gives the kind of each shared flag (by its argparse dest); a script declares its own flags next
# to them, e.g. in a method file's build_parser:
#     g.add_argument("--temperature", type=float, default=None, help=...)
#     p.numbers["temperature"] = "finite positive float"
# or, for a range only one method has, a (test, what it must be) pair instead of a kind's name:
#     p.numbers["jitter_strength"] = (lambda v: 0 <= v <= 1.25, "between 0 and 1.25")
# A flag left at None (filled later from a preset) is not checked; presets are ours and trusted.
NUMBER_KINDS = {  # kind -> (test, what the flag must be)
    "positive int": (lambda v: v >= 1, "a positive integer"),
    "non-negative int": (lambda v: v >= 0, "an integer >= 0"),
    "finite positive float": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "finite non-negative float": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "finite float": (math.isfinite, "a finite number"),
    "in [0, 1]": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    # Ours: below 8 px a crop holds almost nothing and the ResNet's strided layers reduce it to a single pixel.
    "image size": (lambda v: v >= 8, "an integer >= 8 (pixels)"),
    "0 or at least 2": (lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2 (the measures compare pairs)"),
}
NUMBERS = {
    "image_size": "image size", "workers": "non-negative int", "subset": "positive int",
    "epochs": "positive int", "batch_size": "positive int", "accum_steps": "positive int",
    "base_lr": "finite positive float", "weight_decay": "finite non-negative float",
    "warmup_epochs": "finite non-negative float", "seed": "non-negative int",
    "knn_every": "non-negative int", "knn_k": "positive int", "knn_t": "finite positive float",
    "analysis_samples": "0 or at least 2", "log_every": "positive int",
}


def check_numbers(args, kinds):
    """UserError naming the first flag whose value is not of its kind ({dest: name of a NUMBER_KINDS kind, or a
    (test, what) pair})."""
    for name, kind in kinds.items():
        value = getattr(args, name, None)
        test, what = NUMBER_KINDS[kind] if isinstance(kind, str) else kind
        if value is not None and not test(value):
            raise UserError(f"--{name.replace('_', '-')} must be {what}, got {value}")


def warn_if_negative(value, flag, effect):
    """A negative loss weight is a legitimate experiment, but rarely meant: say what it does, on stderr."""
    if value < 0:
        print(f"warning: {flag} {value} is negative: {effect}", file=sys.stderr)


def warn_micro_batches(args, what):
    """--accum-steps N splits a batch-wide term (negatives, uniformity pairs, MMD, singular values) into micro-batches
    of batch/N images (Section 5.1): say so, on stderr. `what` ends in the words before 'micro-batches'."""
    if args.accum_steps > 1:
        print(f"warning: with --accum-steps {args.accum_steps} {what} micro-batches of "
              f"{args.batch_size // args.accum_steps} images, not {args.batch_size} (Section 5.1)", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), defaults shown only where they are not None, and every
    numeric flag checked against its kind: NUMBERS for the shared flags, `parser.numbers` for a script's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.numbers = {}

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        try:
            check_numbers(parsed, {**NUMBERS, **self.numbers})
        except UserError as e:
            self.error(str(e))
        return parsed

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or action.default is False:
            return action.help
        return super()._get_help_string(action)


DATASET_NAMES = ("cifar10", "cifar100", "stl10", "imagenet", "folder")
ARCHS = {"resnet18": 512, "resnet50": 2048}  # feature dimension after global average pooling


def base_parser():
    """Flags shared by every pre-training script (used as `parents=[base_parser()]`).

    Flags whose default is None are filled from the method's preset table (see `apply_presets`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASET_NAMES, metavar="{" + ",".join(DATASET_NAMES) + "}",
                   help="cifar10/cifar100/stl10 are downloaded by torchvision into --data-dir; imagenet and folder "
                        "read <data-dir>/train and <data-dir>/val with ImageFolder")
    g.add_argument("--data-dir", default="./data", help="where datasets live (and are downloaded to)")
    g.add_argument("--image-size", type=int, default=None,
                   help="training resolution: 32 for CIFAR, 64 for STL-10 (Appendix B.5.2), 224 for imagenet/folder "
                        "(Appendix B.5.1)")
    g.add_argument("--eval-split", default="test", choices=("val", "test"),
                   help="val: the held-out split of Appendix B.4 (pre-training then uses the rest of the train set; "
                        "for tuning); test: the official test split (for reporting)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader worker processes")
    g.add_argument("--augment", default="auto", choices=("auto", "batched", "per-image"),
                   help="batched: the uint8 split lives on the training device and the views of a batch are made "
                        "there, parameters drawn per image (cifar10/cifar100/stl10 only); per-image: torchvision "
                        "transforms in DataLoader workers; auto: batched where possible")
    g.add_argument("--subset", type=int, default=None, metavar="N",
                   help="use only the first N images of each split: a quick smoke run, not a result")

    g = p.add_argument_group("model (Appendix B.1)")
    g.add_argument("--arch", default=None, choices=tuple(ARCHS), help="encoder (default: preset)")
    g.add_argument("--stem", default="auto", choices=("auto", "cifar", "imagenet"),
                   help="auto: the CIFAR stem (3x3 conv, stride 1, no max-pool) for cifar10/cifar100, as Appendix B.1 "
                        "says; torchvision's stem for stl10, imagenet and folder")
    g.add_argument("--no-batchnorm", dest="batchnorm", action="store_false",
                   help="remove every BatchNorm from the encoder and the MLP heads (Table 4, 'BN x')")

    g = p.add_argument_group("optimisation (Appendix B.2)")
    g.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: preset); also picks the "
                   "preset row")
    g.add_argument("--batch-size", type=int, default=None,
                   help="the paper's batch size per optimizer step (default: preset); under torchrun the global "
                        "batch: each of W processes takes batch/(W x accum-steps) images per micro-batch")
    g.add_argument("--accum-steps", type=int, default=1,
                   help="split each batch into N micro-batches and accumulate their gradients (Section 5.1). "
                        "BatchNorm statistics are computed per micro-batch of batch-size/N images")
    g.add_argument("--base-lr", type=float, default=None, help="LR_base; LR = LR_base * batch-size / 256")
    g.add_argument("--weight-decay", type=float, default=None, help="LARS weight decay on weights (not biases/BN)")
    g.add_argument("--warmup-epochs", type=float, default=10, help="linear LR warm-up (Appendix B.2)")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto picks cuda when available; cuda runs in bf16 autocast with channels_last")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    g.add_argument("--out-dir", default=None,
                   help="run folder, new or empty (default: runs/<method>-<dataset>-<time>)")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue the run saved in this last.pt (or its run folder) with its own settings; only "
                        "--device, --workers, --data-dir and --sync-bn may be given with it (and the number of "
                        "processes may change), and --epochs N to extend the run (the LR and tau cosines then "
                        "follow an N-epoch run from the resumed step on)")
    g.add_argument("--knn-every", type=int, default=5, help="weighted k-NN accuracy every N epochs and at the end "
                   "(0: only at the end)")
    g.add_argument("--knn-k", type=int, default=200,
                   help="neighbours of the k-NN monitor (InstDisc; Table 1's k-NN is DINO's protocol: 20)")
    g.add_argument("--knn-t", type=float, default=0.1,
                   help="temperature of the k-NN vote weights exp(s/t) (Table 1, DINO's protocol: 0.07)")
    g.add_argument("--analysis-samples", type=int, default=1024,
                   help="eval images (drawn once with a fixed seed over the whole eval split) for the uniformity "
                        "analysis logged with each k-NN evaluation as eval_uniformity, eval_alignment, "
                        "eval_mhe_<sub-network>, eval_energy_<ResNet block> (Figs. 4, 5) and eval_mmd_legendre "
                        "(SFRIK's MMD); 0 turns it off")
    g.add_argument("--log-every", type=int, default=20, help="refresh the progress bar every N steps (under "
                   "torchrun also how often the processes agree on a stop signal)")

    g = p.add_argument_group("many GPUs (torchrun --nproc_per_node W script.py ...; README 'Many GPUs')", """\
  --batch-size is the global batch: each of W processes takes batch/(W x accum-steps) images per micro-batch,
  and the views of an image do not depend on W. Gradients are averaged over the processes: LR, schedules, EMA and
  LARS are those of the global batch. SimCLR's negatives and the uniformity pairs are gathered from all processes
  (with gradients). Rank 0 alone writes the run folder and evaluates. SIGTERM on any process stops all after the
  same step, with one checkpoint. --resume works with another W that divides the micro-batch.""")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="every BatchNorm normalises over the global micro-batch of all processes, as BYOL's "
                        "cross-replica BatchNorm and SimCLR's global BN (the paper is silent; it follows BYOL). "
                        "Default: on under torchrun; only under torchrun")
    return p


def apply_presets(args, presets):
    """Fill every flag left at None from `presets[dataset][epochs]`, the row whose epoch count is nearest.

    `presets` maps a dataset to {epochs: {flag: value}}; the first epochs key is the dataset's default."""
    table = presets[args.dataset]
    if args.epochs is None:
        args.epochs = next(iter(table))
    key = min(table, key=lambda e: abs(e - args.epochs))
    for name, value in table[key].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.preset = f"{args.dataset}/{key} epochs"
    if args.image_size is None:
        args.image_size = DATASETS[args.dataset].image_size
    return args


def preset_epilog(presets, source):
    """The preset table for --help."""
    rows = [f"  {d:<9} {e:>5} epochs: " + ", ".join(f"{k}={v}" for k, v in row.items())
            for d, table in presets.items() for e, row in table.items()]
    return f"presets ({source}; the row nearest to --epochs is used):\n" + "\n".join(rows)


def check_args(args):
    """Checks across flags that argparse cannot do; raises UserError."""
    if args.batch_size % args.accum_steps:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by --accum-steps {args.accum_steps}")
    micro = args.batch_size // args.accum_steps
    if args.batchnorm and micro < 2:
        raise UserError(f"--batch-size {args.batch_size} with --accum-steps {args.accum_steps} gives micro-batches of "
                        f"{micro} image: BatchNorm needs at least 2 images per micro-batch (fewer --accum-steps, or "
                        f"--no-batchnorm)")
    if args.augment == "batched" and args.dataset not in IN_MEMORY:
        raise UserError(f"--augment batched needs an in-memory dataset ({', '.join(IN_MEMORY)}), not {args.dataset}")


RESUME_MAY_CHANGE = ("device", "workers", "data_dir", "sync_bn")  # where and how fast, never what is trained


def given_flags(parser, argv):
    """The dests of the flags written on this command line (not those left at their defaults)."""
    unset, parse = object(), argparse.ArgumentParser.parse_args  # argparse's own: no number checks of `unset`
    names = vars(parse(parser, argv))
    given = vars(parse(parser, argv, argparse.Namespace(**dict.fromkeys(names, unset))))
    return {k for k, v in given.items() if v is not unset}


def resume_settings(parser, argv, args, method):
    """The settings of the run being resumed. --device, --workers, --data-dir and --sync-bn may change; --epochs N
    extends the run to N epochs: from the resumed step on, the LR cosine and the EMA tau schedule are those of an
    N-epoch run (the steps already taken keep theirs), so extending a finished run raises the LR again from the end
    of its old cosine to the N-epoch cosine's value at that step. Any other flag is refused."""
    path = checkpoint_path(args.resume)
    ckpt = load_checkpoint(path)
    saved = ckpt["args"]
    if saved.get("method") != method:
        raise UserError(f"{path} is a {saved.get('method')} run; resume it with {saved.get('method')}.py")
    given = given_flags(parser, argv) - {"resume"}
    options = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    refused = sorted(given - set(RESUME_MAY_CHANGE) - {"epochs"})
    if refused:
        raise UserError(f"{', '.join(options[k] for k in refused)} cannot be given with --resume: the run keeps "
                        f"its own settings (only --device, --workers, --data-dir, --sync-bn and --epochs may change)")
    keep = {k: getattr(args, k) for k in given & set(RESUME_MAY_CHANGE)}
    if "epochs" in given and args.epochs != saved["epochs"]:
        if args.epochs <= ckpt["epoch"]:
            raise UserError(f"--epochs {args.epochs}: {path} has already trained {ckpt['epoch']} epochs; give more "
                            f"to extend it")
        print(f"# --epochs {args.epochs}: the run planned for {saved['epochs']} epochs continues to {args.epochs}; "
              f"from step {ckpt['step']} on, the LR cosine and EMA tau schedule are those of a {args.epochs}-epoch "
              f"run")
        keep["epochs"] = args.epochs
        keep["epochs_changed"] = [*saved.get("epochs_changed", []), [ckpt["step"], saved["epochs"], args.epochs]]
    return argparse.Namespace(**{**saved, **keep, "resume": str(path), "out_dir": str(path.parent)})


def parse_args(parser, argv, presets, method):
    """Parse (numbers checked by Parser), restore the settings of a run being resumed, fill presets, check."""
    args = parser.parse_args(argv)
    if getattr(args, "sync_bn", None) and not under_torchrun():
        raise UserError("--sync-bn needs torchrun (one process already normalises over the whole batch)")
    if args.resume:
        args = resume_settings(parser, argv, args, method)
    else:
        args.method = method
        apply_presets(args, presets)
        check_args(args)
    if getattr(args, "sync_bn", None):
        args.sync_bn = None  # --sync-bn is the default where it is allowed (torchrun): saved as the default
    return args


def print_run(args, objective):
    """Print every argument and the objective as a formula: the run folder describes itself."""
    print(f"# {args.method} | objective: {objective}")
    for k, v in sorted(vars(args).items()):
        print(f"#   {k:>14} = {v}")


# ----------------------------------------------------------------------------------------------------------------
# Data (Appendix B.3, B.4)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    blur_solarize: bool  # Appendix B.5.2: Gaussian blur and solarisation are omitted for CIFAR and STL-10
    val_per_class: int   # Appendix B.4 held-out validation samples per class (0: 10 % of each class)


DATASETS = {
    "cifar10": DatasetInfo(10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), False, 500),
    "cifar100": DatasetInfo(100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), False, 50),
    "stl10": DatasetInfo(10, 64, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), False, 50),
    # Deviation: BYOL holds out the last 10009 images of TensorFlow's ImageNet split; we draw 10 per class
    # (10000 images) with a fixed seed, since that split's file order is not part of an ImageFolder.
    "imagenet": DatasetInfo(1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True, 10),
    # Not in the paper: your own images in class folders, ImageNet statistics and augmentations.
    "folder": DatasetInfo(0, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True, 0),
}


def holdout_split(targets, per_class, seed=0):
    """Appendix B.4: hold out `per_class` random samples of each class (10 % when 0), the same in every run, and at
    most all but one of a class (which only matters for tiny datasets).

    Returns (train_indices, val_indices) as sorted lists."""
    targets = torch.as_tensor(targets)
    g = torch.Generator().manual_seed(seed)
    val = []
    for c in targets.unique().tolist():
        idx = (targets == c).nonzero().flatten()
        n = min(per_class or max(1, len(idx) // 10), len(idx) - 1)
        val.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    val = torch.cat(val).sort().values
    keep = torch.ones(len(targets), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten().tolist(), val.tolist()


@dataclass
class Data:
    pretrain: Dataset  # images for self-supervised training (labels unused)
    bank: Dataset      # labelled training images: the k-NN memory bank and the linear probe's training set
    eval: Dataset      # labelled val or test images
    num_classes: int


def _targets(ds):
    return ds.labels if hasattr(ds, "labels") else ds.targets


def load_data(dataset, data_dir, eval_split, subset=None):
    """Datasets as PIL images through torchvision's own loaders (Appendix B.4 splits); `subset` keeps the first
    N images of each split."""
    info, root = DATASETS[dataset], Path(data_dir)
    tv = torchvision.datasets
    try:
        if dataset in ("cifar10", "cifar100"):
            cls = tv.CIFAR10 if dataset == "cifar10" else tv.CIFAR100
            train, test = cls(root, train=True, download=True), cls(root, train=False, download=True)
            unlabeled = train
        elif dataset == "stl10":  # Appendix B.4: pre-train on the unlabeled split
            unlabeled = tv.STL10(root, split="unlabeled", download=True)
            train, test = tv.STL10(root, split="train", download=True), tv.STL10(root, split="test", download=True)
        else:
            for sub in ("train", "val"):
                if not (root / sub).is_dir():
                    raise UserError(f"{dataset} expects image folders {root / 'train'} and {root / 'val'}; "
                                    f"{root / sub} does not exist")
            train, test = (tv.ImageFolder(root / sub, loader=read_image) for sub in ("train", "val"))
            if train.classes != test.classes:  # ImageFolder numbers the classes of each folder on its own
                raise UserError(f"{root / 'val'} and {root / 'train'} hold different classes, so their labels "
                                f"would not match: {class_difference(train.classes, test.classes)}")
            unlabeled = train
    except UserError:
        raise
    except Exception as e:  # no network, corrupt files, ...: one line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {dataset} from {root}: {msg}") from e
    num_classes = info.num_classes or len(train.classes)
    if eval_split == "test":
        data = Data(unlabeled, train, test, num_classes)
    else:
        train_idx, val_idx = holdout_split(_targets(train), info.val_per_class)
        pretrain = unlabeled if unlabeled is not train else Subset(train, train_idx)
        data = Data(pretrain, Subset(train, train_idx), Subset(train, val_idx), num_classes)
    if subset:
        first = lambda ds: Subset(ds, range(min(subset, len(ds))))  # noqa: E731
        data = Data(first(data.pretrain), first(data.bank), first(data.eval), num_classes)
    return data


def class_difference(train, val):
    """'val lacks a, b; val adds c' for two lists of class names."""
    parts = []
    for what, names in (("val lacks", sorted(set(train) - set(val))), ("val adds", sorted(set(val) - set(train)))):
        if names:
            parts.append(f"{what} {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
    return "; ".join(parts)


def read_image(path):
    """ImageFolder's loader (PIL, RGB) that names the file it cannot read instead of failing in a worker."""
    try:
        return torchvision.datasets.folder.pil_loader(path)
    except (OSError, ValueError, SyntaxError) as e:  # truncated, corrupt or not an image at all
        raise UserError(f"cannot read image {path}: {e}") from None


class Transformed(Dataset):
    """(transform(image), label) over a dataset of (PIL image, label)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return self.transform(image), label


class Views(Dataset):
    """The views of one image, one per transform (two for most methods). Indexed by (index, seed): the
    augmentations of a sample are a pure function of its seed, so a run resumed in the middle of an epoch sees
    exactly the views of the uninterrupted run."""

    def __init__(self, base, *transforms):
        self.base, self.transforms = base, transforms

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        image = self.base[index][0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return tuple(view(image) for view in self.transforms)


class EpochBatches(torch.utils.data.Sampler):
    """Micro-batches of (index, augmentation seed) for one epoch, drawn from (seed, epoch) alone.

    An epoch is `steps` optimizer steps of `accum` micro-batches; the incomplete last batch is dropped. Process
    `rank` of `world` takes the rank-th of `world` equal consecutive parts (`share`) of every global micro-batch."""

    def __init__(self, n, micro_batch, steps, accum, seed, rank=0, world=1):
        self.n, self.micro_batch, self.steps, self.accum, self.seed = n, micro_batch, steps, accum, seed
        self.epoch, self.start = 0, 0
        part = micro_batch // world
        self.share = slice(rank * part, (rank + 1) * part)

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step * self.accum

    def __len__(self):
        return self.steps * self.accum - self.start

    def micro_batches(self, device=None):
        """(image indices on `device`, augmentation seeds) of each remaining global micro-batch of the epoch."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order, seeds = torch.randperm(self.n, generator=g), torch.randint(2**62, (self.n,), generator=g)
        order, m = order.to(device), self.micro_batch
        for b in range(self.start, self.steps * self.accum):
            yield order[b * m:(b + 1) * m], seeds[b * m:(b + 1) * m]

    def __iter__(self):
        for index, seeds in self.micro_batches():
            yield list(zip(index[self.share].tolist(), seeds[self.share].tolist()))


IN_MEMORY = ("cifar10", "cifar100", "stl10")  # small enough to live on the training device as uint8


def _unwrap(ds):
    """The torchvision dataset inside any Subsets, and the indices into it (None: all of it)."""
    index = None
    while isinstance(ds, Subset):
        outer = torch.as_tensor(ds.indices, dtype=torch.long)
        index = outer if index is None else outer[index]
        ds = ds.dataset
    return ds, index


def uint8_images(ds):
    """The uint8 images (N, 3, H, W) of an in-memory torchvision dataset (CIFAR keeps (N, H, W, 3), STL-10
    (N, 3, H, W)), through any Subsets around it."""
    base, index = _unwrap(ds)
    x = torch.from_numpy(base.data)
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return (x if index is None else x[index]).contiguous()


def labels_of(ds):
    """The labels (N,) of a dataset, through any Subsets around it."""
    base, index = _unwrap(ds)
    y = torch.as_tensor(_targets(base), dtype=torch.long)
    return y if index is None else y[index]


class DeviceViews:
    """The views of each micro-batch (one per entry of `views`), made by share_view (batched_view of this process's
    share) from the whole uint8 split held on the device: no DataLoader, no host-to-device copy per step. Same order
    as EpochBatches; each micro-batch's augmentations come from a generator seeded by (seed, epoch, position), so a
    resumed run sees the same views. Under torchrun every process draws the parameters of the whole global
    micro-batch and makes the views of its share only, so the views of an image do not depend on the number of
    processes."""

    def __init__(self, images, sampler, dataset, size, views):
        self.images, self.sampler, self.dataset, self.size, self.views = images, sampler, dataset, size, views

    def __iter__(self):
        dev, share = self.images.device, self.sampler.share
        for index, seeds in self.sampler.micro_batches(dev):
            g = torch.Generator(dev).manual_seed(int(seeds[0]))
            images = self.images[index[share]]
            yield tuple(share_view(images, len(index), share, self.dataset, self.size, *v, g=g) for v in self.views)


# ----------------------------------------------------------------------------------------------------------------
# Augmentations (Appendix B.5)
# ----------------------------------------------------------------------------------------------------------------
def blur_kernel_size(image_size):
    """23x23 at 224 px (Appendix B.5), scaled with the image size to the nearest odd size."""
    return max(3, 2 * round((23 * image_size / 224 - 1) / 2) + 1)


# Appendix B.5, shared by the per-image pipeline below and the batched one (section "Batched augmentations").
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)           # area fraction; aspect ratio, log-uniform
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)   # BYOL's; a view may give its own (simclr.py)
JITTER_P, GRAY_P, BLUR_SIGMA = 0.8, 0.2, (0.1, 2.0)


def ssl_augmentation(dataset, image_size, blur_p, solarize_p, jitter=JITTER, jitter_p=JITTER_P):
    """One view of Appendix B.5 for one PIL image, in the paper's order: crop, flip, colour jitter, grayscale, blur,
    solarise. The readable reference, and the pipeline of imagenet/folder; see batched_view for the batched one.
    A view specification is (blur_p, solarize_p), (blur_p, solarize_p, jitter) or (blur_p, solarize_p, jitter,
    jitter_p) (sfrik.py's STL-10 recipe jitters with p = 1): `*view` fills these arguments."""
    info = DATASETS[dataset]
    ops = [
        T.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        # ColorJitter applies brightness, contrast, saturation and hue in a random order for each image.
        T.RandomApply([T.ColorJitter(**jitter)], p=jitter_p),
        T.RandomGrayscale(p=GRAY_P),  # luma 0.2989 r + 0.587 g + 0.114 b
    ]
    if info.blur_solarize and blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(image_size), sigma=BLUR_SIGMA)], p=blur_p))
    ops.append(T.ToTensor())
    if info.blur_solarize and solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=0.5, p=solarize_p))  # x -> 1 - x where x >= 0.5, on [0, 1]
    ops.append(T.Normalize(info.mean, info.std))
    return T.Compose(ops)


def eval_transform(dataset, image_size):
    """Appendix B.5.1/B.5.2: CIFAR centre crop 28 then resize 32; STL-10 56 then 64 (after resizing the 96 px
    images to 64); ImageNet resize 256 then centre crop 224. Other sizes scale these ratios."""
    info = DATASETS[dataset]
    bicubic = T.InterpolationMode.BICUBIC
    if info.blur_solarize:  # ImageNet-style
        ops = [T.Resize(round(image_size * 256 / 224), interpolation=bicubic), T.CenterCrop(image_size)]
    else:
        ops = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(round(image_size * 7 / 8)),
               T.Resize(image_size, interpolation=bicubic)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(info.mean, info.std)])


def probe_transform(dataset, image_size):
    """Linear-probe training augmentation: random resized crop and horizontal flip (BYOL / SimCLR protocol)."""
    info = DATASETS[dataset]
    return T.Compose([T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(info.mean, info.std)])


# ----------------------------------------------------------------------------------------------------------------
# Batched augmentations: the views of a whole uint8 batch on its device, every random parameter drawn per sample
# from the same distributions as the per-image pipeline above (torchvision.transforms.v2 applied to a batch would
# draw one set of parameters for the whole batch). Images are floats in [0, 1] until the final normalisation.
# ----------------------------------------------------------------------------------------------------------------
def sample_crops(n, height, width, g, device="cpu"):
    """torchvision's RandomResizedCrop.get_params for n images at once: up to 10 tries of area ~ U(scale) * H * W and
    log-aspect ~ U(log ratio); the first try that fits wins; if none fits, the central crop of clamped aspect.
    Returns (top, left, height, width), each (n,) float."""
    area = height * width * torch.empty(n, 10, device=device).uniform_(*CROP_SCALE, generator=g)
    aspect = torch.exp(torch.empty(n, 10, device=device).uniform_(*map(math.log, CROP_RATIO), generator=g))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    top = torch.floor(torch.rand(n, device=device, generator=g) * (height - h + 1))
    left = torch.floor(torch.rand(n, device=device, generator=g) * (width - w + 1))
    # fallback when no try fits: the whole image, cut to the nearest allowed aspect ratio, centred
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        fw, fh = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        fw, fh = round(height * CROP_RATIO[1]), height
    else:
        fw, fh = width, height
    ok = fits.any(dim=1)
    fallback = lambda value, default: torch.where(ok, value, torch.full_like(value, default))  # noqa: E731
    return (fallback(top, (height - fh) // 2), fallback(left, (width - fw) // 2), fallback(h, fh), fallback(w, fw))


def _cubic(x, a=-0.5):
    """Keys' cubic convolution kernel with a = -0.5, as PIL's and torch's antialiased bicubic resampling."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start, length, in_size, out_size):
    """(n, out_size, in_size) matrices M with (M @ signal) = the window [start, start + length) of each length-in_size
    signal resized to out_size samples by antialiased bicubic interpolation, as torch.nn.functional.interpolate(
    mode="bicubic", antialias=True) and PIL resize the cropped image: taps never leave the window."""
    scale = (length / out_size)[:, None, None]                                  # (n, 1, 1) input px per output px
    support = 2 * scale.clamp(min=1)                                            # 2 taps a side, wider to antialias
    centre = scale * (torch.arange(out_size, device=start.device)[None, :, None] + 0.5)     # (n, out, 1) in window
    x = torch.arange(in_size, device=start.device)[None, None, :] - start[:, None, None]    # (n, 1, in) in window
    lo = torch.floor(centre - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.floor(centre + support + 0.5), length[:, None, None])
    w = _cubic((x - centre + 0.5) / scale.clamp(min=1)) * ((x >= lo) & (x < hi))
    return w / w.sum(dim=-1, keepdim=True)


def resized_crop(images, top, left, height, width, size, flip=None):
    """Crop each image (n, C, H, W) to its window and resize it to size x size with bicubic antialiased resampling,
    mirrored left-right where `flip` (n,) is true: two batched matrix products, out = W_y @ image @ W_x^T."""
    wy = resize_weights(top, height, images.shape[-2], size)                   # (n, size, H)
    wx = resize_weights(left, width, images.shape[-1], size)                   # (n, size, W)
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    return torch.einsum("nyh,nchw,nxw->ncyx", wy, images, wx).clamp(0, 1)     # as uint8 images clip


def grayscale(x):
    """ITU-R 601 luma 0.2989 r + 0.587 g + 0.114 b (Appendix B.5), (n, 1, H, W)."""
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(x, y, factor):
    return (factor[:, None, None, None] * x + (1 - factor[:, None, None, None]) * y).clamp(0, 1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return _blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), factor)


def adjust_hue(x, shift):
    """Rotate the hue of each image by shift (n,) turns, through HSV as torchvision does."""
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    chroma = maxc - minc
    flat = chroma == 0
    sat = chroma / torch.where(flat, torch.ones_like(maxc), maxc)
    c = torch.where(flat, torch.ones_like(chroma), chroma)
    hue = torch.where(maxc == r, (g - b) / c, torch.where(maxc == g, 2 + (b - r) / c, 4 + (r - g) / c))
    hue = torch.where(flat, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6 + 1 + shift[:, None, None], 1.0)               # shifted hue in [0, 1)
    # HSV -> RGB
    h6 = hue * 6
    sector = torch.floor(h6).long() % 6
    f = h6 - torch.floor(h6)
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    table = torch.stack([torch.stack(rgb) for rgb in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])  # (6, 3, n, H, W)
    index = sector[None, None].expand(1, 3, *sector.shape)
    return table.gather(0, index)[0].permute(1, 0, 2, 3)


COLOUR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's ColorJitter order


def colour_jitter(x, factors, order, apply, whole_batch=None):
    """ColorJitter per sample: factors (n, 4) for brightness, contrast, saturation, hue; order (n, 4) a permutation
    of the four operations for each image; apply (n,) whether the image is jittered at all.

    whole_batch (default: on CUDA) runs every operation on the whole batch and keeps each image's own with
    torch.where, which never waits for the host; otherwise each operation runs only on the images that need it,
    4x less arithmetic for the CPU. Both give the same images."""
    whole_batch = x.is_cuda if whole_batch is None else whole_batch
    for position in range(4):
        chosen = [apply & (order[:, position] == k) for k in range(len(COLOUR_OPS))]
        if whole_batch:
            x = sum(torch.where(c[:, None, None, None], op(x, factors[:, k]), 0.0)
                    for k, (op, c) in enumerate(zip(COLOUR_OPS, chosen))) + torch.where(
                        (~apply)[:, None, None, None], x, 0.0)
        else:
            for k, (op, c) in enumerate(zip(COLOUR_OPS, chosen)):
                rows = c.nonzero().flatten()
                if len(rows):
                    x = x.index_copy(0, rows, op(x[rows], factors[rows, k]))
    return x


def gaussian_blur(x, sigma, kernel_size):
    """Per-image Gaussian blur, reflect padding, as torchvision's gaussian_blur: sigma (n,)."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)           # (n*C, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)                          # vertical pass
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)                          # horizontal pass
    return y.reshape(n, c, h, w)


def solarize(x):
    return torch.where(x >= 0.5, 1 - x, x)  # Appendix B.5: x -> 1 - x where x >= 0.5


@functools.lru_cache
def _constants(device, values):
    """A small constant tensor, copied to `device` once: a copy from the host on every step would make the GPU
    stream wait for the host each time."""
    return torch.tensor(values, device=device)


def view_params(n, height, width, blur_p, solarize_p, g, device="cpu", jitter=JITTER, jitter_p=JITTER_P):
    """Every random parameter of one view (Appendix B.5) for each of n images of height x width, from generator g."""
    u = lambda *shape: torch.rand(*shape, device=device, generator=g)  # noqa: E731
    b, c, s, h = jitter["brightness"], jitter["contrast"], jitter["saturation"], jitter["hue"]
    device = torch.device(device)
    lo, hi = _constants(device, (1 - b, 1 - c, 1 - s, -h)), _constants(device, (1 + b, 1 + c, 1 + s, h))
    return dict(crop=sample_crops(n, height, width, g, device), flip=u(n) < 0.5,
                jitter=u(n) < jitter_p, factors=lo + (hi - lo) * u(n, 4), order=u(n, 4).argsort(dim=1),
                gray=u(n) < GRAY_P, blur=u(n) < blur_p, sigma=BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u(n),
                solarize=u(n) < solarize_p)


def apply_view(images, p, dataset, size):
    """The view with parameters p (from view_params) of uint8 images (n, 3, H, W): normalised floats (n, 3, size,
    size). Blur and solarisation only where the dataset has them (Appendix B.5.2)."""
    def where(mask, a, b):
        return torch.where(mask[:, None, None, None], a, b)
    x = resized_crop(images.float() / 255, *p["crop"], size, flip=p["flip"])
    x = colour_jitter(x, p["factors"], p["order"], p["jitter"])
    x = where(p["gray"], grayscale(x).expand_as(x), x)
    if DATASETS[dataset].blur_solarize:
        x = where(p["blur"], gaussian_blur(x, p["sigma"], blur_kernel_size(size)), x)
        x = where(p["solarize"], solarize(x), x)
    return normalise(x, dataset)


def normalise(x, dataset):
    """Per-channel (x - mean) / std with the dataset's statistics (Appendix B.5.1)."""
    info = DATASETS[dataset]
    mean, std = _constants(x.device, info.mean), _constants(x.device, info.std)
    return (x - mean[:, None, None]) / std[:, None, None]


def batched_view(images, dataset, size, blur_p, solarize_p, jitter=JITTER, jitter_p=JITTER_P, *, g):
    """One augmented view of every uint8 image (n, 3, H, W) on its device, each image with its own parameters drawn
    from generator g; `*view` of a view specification (see ssl_augmentation) fills blur_p, solarize_p, jitter,
    jitter_p."""
    return share_view(images, images.shape[0], slice(None), dataset, size, blur_p, solarize_p, jitter, jitter_p, g=g)


def share_view(images, n, rows, dataset, size, blur_p, solarize_p, jitter=JITTER, jitter_p=JITTER_P, *, g):
    """batched_view of the images at `rows` (a slice) of a micro-batch of n images, given only those images: the
    parameters of all n are drawn from g, so an image's view does not depend on how the micro-batch is shared."""
    p = view_params(n, images.shape[-2], images.shape[-1], blur_p, solarize_p, g, images.device, jitter, jitter_p)
    return apply_view(images, {k: tuple(t[rows] for t in v) if isinstance(v, tuple) else v[rows]
                               for k, v in p.items()}, dataset, size)


def eval_view(images, dataset, size):
    """eval_transform of a square in-memory dataset (Appendix B.5.2) for uint8 images (n, 3, H, W) on their device:
    resize to size, centre crop 7/8 of it, resize back to size."""
    x, n, dev = images.float() / 255, images.shape[0], images.device
    const = lambda v: torch.full((n,), float(v), device=dev)  # noqa: E731
    if images.shape[-1] != size:
        x = resized_crop(x, const(0), const(0), const(images.shape[-2]), const(images.shape[-1]), size)
    crop = round(size * 7 / 8)
    offset = int(round((size - crop) / 2))  # torchvision's CenterCrop offset
    return normalise(resized_crop(x, const(offset), const(offset), const(crop), const(crop), size), dataset)


def probe_view(images, dataset, size, g):
    """probe_transform (random resized crop, flip) for uint8 images (n, 3, H, W) on their device, per image."""
    n, dev = images.shape[0], images.device
    crop = sample_crops(n, images.shape[-2], images.shape[-1], g, dev)
    flip = torch.rand(n, device=dev, generator=g) < 0.5
    return normalise(resized_crop(images.float() / 255, *crop, size, flip=flip), dataset)


class DeviceBatches:
    """(images, labels) batches of a labelled in-memory split held on the device as uint8 and transformed there:
    in order through eval_view, or, given a seed, through probe_view in a new random order on every pass."""

    def __init__(self, ds, dataset, size, batch_size, device, seed=None):
        self.images, self.labels = uint8_images(ds).to(device), labels_of(ds).to(device)
        self.dataset, self.size, self.batch_size, self.seed, self.passes = dataset, size, batch_size, seed, 0

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        dev = self.images.device
        if self.seed is None:
            order = torch.arange(len(self.labels), device=dev)
        else:
            g = torch.Generator(dev).manual_seed(self.seed * 1_000_003 + self.passes)
            order = torch.randperm(len(self.labels), device=dev, generator=g)
            self.passes += 1
        for chunk in order.split(self.batch_size):
            x = self.images[chunk]
            x = eval_view(x, self.dataset, self.size) if self.seed is None else probe_view(x, self.dataset,
                                                                                          self.size, g)
            yield x, self.labels[chunk]


# ----------------------------------------------------------------------------------------------------------------
# Model (Appendix B.1, Section 3.6)
# ----------------------------------------------------------------------------------------------------------------
def resolve_stem(stem, dataset):
    """Appendix B.1 changes the stem 'for the CIFAR datasets' only, so STL-10 (64 px) keeps torchvision's."""
    if stem != "auto":
        return stem
    return "cifar" if dataset in ("cifar10", "cifar100") else "imagenet"


def build_encoder(arch, stem, batchnorm=True):
    """torchvision ResNet with `fc` removed, so it outputs the pooled feature (512 or 2048 wide).

    stem='cifar' (Appendix B.1): conv1 becomes 3x3 with stride 1 and the max-pool is removed.
    batchnorm=False replaces every BatchNorm by the identity (Table 4). Each block's last BatchNorm scale starts
    at zero (zero_init_residual), as in BYOL's (Haiku) and SimCLR's ResNets, whose procedure Section 3.6 follows."""
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")
    norm_layer = None if batchnorm else (lambda channels: nn.Identity())
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer, zero_init_residual=batchnorm)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, ARCHS[arch]


def encoder_for(args):
    """The encoder a run's settings (a Namespace or its vars() dict) describe: (module, feature size)."""
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    return build_encoder(args["arch"], resolve_stem(args["stem"], args["dataset"]), args.get("batchnorm", True))


def mlp(in_dim, hidden_dim=4096, out_dim=256, batchnorm=True):
    """Projector g and predictor q of Section 3.6: Linear -> BatchNorm -> ReLU -> Linear, the last Linear without
    bias as in BYOL's code."""
    norm = nn.BatchNorm1d(hidden_dim) if batchnorm else nn.Identity()
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), norm, nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False))


# ----------------------------------------------------------------------------------------------------------------
# Optimisation (Appendix B.2)
# ----------------------------------------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as used by SimCLR and BYOL (Appendix B.2).

    For a weight w with ndim > 1 and gradient g:   u = g + wd * w,   u <- eta * ||w|| / ||u|| * u
    For biases and BatchNorm parameters (ndim <= 1):   u = g   (no weight decay, no trust ratio)
    Then, with momentum m:   v <- m * v + lr * u,   w <- w - v
    """

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust_coefficient=1e-3):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        """The formula above for all parameters at once with torch._foreach_* ops: a few kernels per step, and the
        trust ratios stay on the device (no host synchronisation)."""
        for group in self.param_groups:
            params = [w for w in group["params"] if w.grad is not None]
            if not params:
                continue
            for w in params:
                if "momentum_buffer" not in self.state[w]:
                    self.state[w]["momentum_buffer"] = torch.zeros_like(w)
            weights = [w for w in params if w.ndim > 1]                       # trust ratio and weight decay
            others = [w for w in params if w.ndim <= 1]                       # biases, BatchNorm: plain SGD
            u = []
            if weights:
                u = list(torch._foreach_add([w.grad for w in weights], weights, alpha=group["weight_decay"]))
                w_norm, u_norm = torch.stack(torch._foreach_norm(weights)), torch.stack(torch._foreach_norm(u))
                trust = torch.where((w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm, 1.0)
                torch._foreach_mul_(u, list(trust.unbind()))
            updates = u + [w.grad for w in others]
            buffers = [self.state[w]["momentum_buffer"] for w in weights + others]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates, alpha=group["lr"])
            torch._foreach_sub_(weights + others, buffers)


def scaled_lr(base_lr, batch_size):
    """Appendix B.2: LR = LR_base x BatchSize / 256 (also the linear probe's, as BYOL's evaluation scales it)."""
    return base_lr * batch_size / 256


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Appendix B.2: linear warm-up from 0 to peak_lr over warmup_steps, then cosine decay to 0 at total_steps.
    peak_lr = LR_base * batch / 256."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_tau(step, total_steps, tau_base):
    """Appendix B.2: tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, from tau_base at k=0 to 1 at k=K."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total_steps) + 1) / 2


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: weighted k-NN monitor, uniformity (Eq. 2 and SFRIK's Legendre MMD) and alignment
# ----------------------------------------------------------------------------------------------------------------
def knn_predict(bank, bank_labels, queries, num_classes, k=200, t=0.1):
    """Weighted k-NN of InstDisc (Wu et al., 2018): the k bank features most cosine-similar to a query vote for
    their class with weight exp(s / t). bank (M, D) and queries (Q, D) are L2-normalised. Returns (Q, C) scores."""
    scores = []
    for q in queries.split(1024):
        s, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)       # (Q', k)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        scores.append(votes.scatter_add_(1, bank_labels[idx], (s / t).exp()))
    return torch.cat(scores)


def fp32(x):
    """Leave any autocast region: these measures are computed in float32 (a bf16 exp/arccos is too coarse)."""
    return torch.autocast(x.device.type, enabled=False)


def uniformity_loss(z, t=2.0):
    """Eq. 2 (Wang & Isola, 2020): log of the mean of exp(-t ||z_i - z_j||^2) over the distinct pairs of the
    L2-normalised rows of z (B, D). Lower is more uniform on the hypersphere."""
    with fp32(z):
        z = F.normalize(z.float(), dim=1)
        return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log()


def alignment_loss(x, y, alpha=2):
    """Eq. A.1: mean of ||x_i - y_i||^alpha over positive pairs of L2-normalised rows of x, y (B, D)."""
    with fp32(x):
        x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
        return (x - y).norm(dim=1).pow(alpha).mean()


def legendre(t, degree, dim):
    """The Legendre (Gegenbauer) polynomial P_l of `degree` l in dimension q = `dim`, normalised so that P_l(1) = 1
    (Zheng et al., 2023, SFRIK): P_0 = 1, P_1(t) = t, P_2(t) = (q t^2 - 1) / (q - 1), P_3(t) = ((q + 2) t^3 - 3 t) /
    (q - 1), and in general P_(k+1) = ((2k + q - 2) t P_k - k P_(k-1)) / (k + q - 2). For q = 3 they are Legendre's,
    for q = 2 Chebyshev's cos(l theta). t: a tensor of cosines, entrywise."""
    if dim < 2 or degree < 0:
        raise ValueError(f"need dim >= 2 and degree >= 0, got dim={dim}, degree={degree}")
    previous, p = torch.ones_like(t), t
    if degree == 0:
        return previous
    for k in range(1, degree):
        previous, p = p, ((2 * k + dim - 2) * t * p - k * previous) / (k + dim - 2)
    return p


LEGENDRE_WEIGHTS = (1.0, 40.0, 40.0)  # b_1, b_2, b_3 of SFRIK's official recipes


def mmd_to_uniform(z, weights=LEGENDRE_WEIGHTS):
    """SFRIK's uniformity term (Zheng et al., 2023): the squared MMD between the L2-normalised rows z_i of z (n, q)
    and the uniform law on the sphere S^(q-1), for the rotation-invariant kernel psi(<x, y>) = sum_l b_l P_l(<x, y>)
    with b = `weights` (b_1, b_2, ...) >= 0. Every P_l with l >= 1 averages to 0 against the uniform law, so
        M(Z) = (1 / n^2) sum_(i, j) psi(<z_i, z_j>),   all n^2 pairs, the diagonal included.
    0 for a spherical design of strength len(weights), sum(weights) for a collapse. Computed in float32."""
    with fp32(z):
        z = F.normalize(z.float(), dim=1)
        gram = z @ z.T                                                      # (n, n) cosines
        psi = sum(b * legendre(gram, l, z.shape[1]) for l, b in enumerate(weights, start=1))
        return psi.mean()


def legendre_weights(text):
    """--legendre-weights: comma-separated b_1,b_2,... >= 0 (a positive-definite kernel, Schoenberg's theorem)."""
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers b_1,b_2,..., e.g. 1,40,40")
    if any(not w >= 0 or math.isinf(w) for w in weights):
        raise argparse.ArgumentTypeError(f"{text!r}: every b_l must be a finite number >= 0 (a kernel with a "
                                         f"negative weight is not positive definite)")
    return weights


MHE_POWERS = ("0", "1", "2", "a0", "a1", "a2")
MHE_EPS = 1e-6  # keeps identical / opposite neurons finite: squared distances >= eps, cosines inside [-1+eps, 1-eps]


def hyperspherical_energy(weight, power):
    """Hyperspherical energy of one layer's neurons (Liu et al., 2018), normalised by 1 / (N (N - 1)) as in Eq. 7.

    A neuron is a row of a linear weight (N, d) or an output filter of a conv weight (N, C, k, k) flattened to
    C*k*k; neurons are projected onto the unit sphere. power: "0", "1", "2" use the Euclidean distance
    d_ij = ||w_i - w_j|| (Eq. 5), "a0", "a1", "a2" the angle d_ij = arccos(w_i . w_j) (Eq. A.3); the kernel is
    d^-s for s > 0 and log(1 / d) for s = 0. Returns sum_{i != j} r_s(d_ij) / (N (N - 1)) as a float32 scalar."""
    return layer_energies(weight.flatten(1)[None], power)[0]


def layer_energies(neurons, power):
    """hyperspherical_energy of G layers of equal shape at once: neurons (G, N, d) -> (G,), one batched Gram product."""
    if power not in MHE_POWERS:
        raise ValueError(f"power must be one of {MHE_POWERS}, got {power!r}")
    s = int(power[-1])
    with fp32(neurons):
        w = F.normalize(neurons.float(), dim=-1)                           # (G, N, d) on the unit sphere
        n = w.shape[-2]
        cos = w @ w.transpose(-1, -2)                                      # (G, N, N)
        if power.startswith("a"):
            d = torch.arccos(cos.clamp(-1 + MHE_EPS, 1 - MHE_EPS))         # geodesic distance, Eq. A.3
        else:
            d = (2 - 2 * cos).clamp_min(MHE_EPS).sqrt()                   # ||w_i - w_j||^2 = 2 - 2 cos, Eq. 5
        r = -torch.log(d) if s == 0 else d.pow(-s)                          # Riesz s-kernel; log(1/d) for s = 0
        diagonal = torch.eye(n, dtype=torch.bool, device=w.device)
        return r.masked_fill(diagonal, 0).sum(dim=(-2, -1)) / (n * (n - 1))


def total_energy(weights, power):
    """The sum of hyperspherical_energy over a list of layer weights, layers of equal shape batched together."""
    groups = {}
    for w in weights:
        groups.setdefault(tuple(w.shape), []).append(w.flatten(1))
    return sum(layer_energies(torch.stack(group), power).sum() for group in groups.values())


def layer_weights(module):
    """The neurons' weights of a network: every conv and linear weight (ndim > 1); biases and BatchNorm excluded."""
    return [p for p in module.parameters() if p.ndim > 1]


@contextlib.contextmanager
def eval_mode(module):
    """Evaluate without touching training state: eval mode (BatchNorm statistics frozen), no autograd, and every
    submodule's train/eval flag restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, training in modes:
            m.training = training


def encode(encoder, x, device):
    """The features of one batch x: moved to the device, encoded under its autocast, returned in float32."""
    with autocast(device):
        return encoder(to_device(x, device)).float()


def extract_features(encoder, loader, device, normalize=True):
    """Encoder features (L2-normalised unless normalize=False) and labels of a whole loader, in fp32."""
    feats, labels = [], []
    with eval_mode(encoder):
        for x, y in loader:
            f = encode(encoder, x, device)
            feats.append(F.normalize(f, dim=1) if normalize else f)
            labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(encoder, bank_loader, eval_loader, num_classes, device, k=200, t=0.1):
    """Top-1 (%) of the weighted k-NN classifier: bank = labelled train split, queries = eval split."""
    bank, bank_labels = extract_features(encoder, bank_loader, device)
    queries, labels = extract_features(encoder, eval_loader, device)
    return accuracy(knn_predict(bank, bank_labels, queries, num_classes, k, t), labels, 1)


def accuracy(scores, labels, k=1):
    """Top-k accuracy (%): the label is among the k highest scores (Appendix B.4)."""
    k = min(k, scores.shape[1])
    return 100.0 * (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()


SUBNETWORKS = ("encoder", "projector", "predictor")


def analysis_images(ds, n, seed=0):
    """The uniformity analysis' images: n of the split drawn once with a fixed seed, spread over the whole split
    (the first n of a class-sorted ImageFolder would cover a few classes), the same at every evaluation and run."""
    index = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, index.sort().values.tolist())


def residual_blocks(encoder):
    """{torchvision module path: block} of every residual block of a ResNet, e.g. layer1.0 ... layer4.1 for
    ResNet-18 (8 blocks), layer1.0 ... layer4.2 for ResNet-50 (16). A stage's output is its last block's output."""
    kinds = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
    return {name: m for name, m in encoder.named_modules() if isinstance(m, kinds)}


def representation_analysis(model, images, dataset, image_size, views, power, device, workers=0, on_device=False):
    """The paper's uniformity analysis on a fixed set of eval images (labels unused), logged under eval_ names so
    that no training term is overwritten: eval_uniformity (Eq. 2, t=2) and eval_mmd_legendre (SFRIK's Legendre MMD
    to the uniform law, b = 1, 40, 40) of the L2-normalised encoder features; eval_alignment (Eq. A.1) between the
    features of two augmented views of each image; eval_mhe_<sub-network>, the MHE objective of each sub-network
    with `power` (Fig. 5b); and eval_energy_<block>, the hyperspherical energy of each ResNet block's globally
    pooled output over the images (Fig. 4: "the output of each ResNet block"), named by the block's torchvision
    module path (eval_energy_layer1.0, ...).

    The views are the same at every evaluation; alignment is between the first two of `views` (a multi-view
    method's first pair). on_device: the images (of an in-memory dataset) are transformed on the device by eval_view
    and batched_view; otherwise per image by PIL in DataLoader workers."""
    encoder, views = model.encoder, views[:2]
    clean = (x for x, _ in eval_batches(images, dataset, image_size, 256, workers, device if on_device else None))
    if on_device:
        g = torch.Generator(device).manual_seed(0)
        pairs = (tuple(batched_view(x, dataset, image_size, *v, g=g) for v in views)
                 for x in uint8_images(images).to(device).split(256))
    else:
        pairs = DataLoader(Views(images, *(ssl_augmentation(dataset, image_size, *v) for v in views)),
                           sampler=[(i, i) for i in range(len(images))],  # seed i for image i
                           batch_size=256, num_workers=workers, worker_init_fn=_workers_ignore_signals)

    blocks = residual_blocks(encoder)
    pooled = {name: [] for name in blocks}
    hooks = [block.register_forward_hook(
        lambda module, inputs, output, name=name: pooled[name].append(output.float().mean(dim=(2, 3))))
        for name, block in blocks.items()]
    with eval_mode(encoder):
        try:
            feats = torch.cat([encode(encoder, x, device) for x in clean])
        finally:
            for h in hooks:
                h.remove()
        f1, f2 = zip(*[(encode(encoder, x1, device), encode(encoder, x2, device)) for x1, x2 in pairs])
        row = {"eval_uniformity": uniformity_loss(feats).item(),
               "eval_alignment": alignment_loss(torch.cat(f1), torch.cat(f2)).item(),
               "eval_mmd_legendre": mmd_to_uniform(feats).item()}
        for part in SUBNETWORKS:
            if hasattr(model, part):
                row[f"eval_mhe_{part}"] = total_energy(layer_weights(getattr(model, part)), power).item()
        for name, outputs in pooled.items():
            row[f"eval_energy_{name}"] = hyperspherical_energy(torch.cat(outputs), power).item()
    return row


def eval_batches(ds, dataset, image_size, batch_size, workers, device=None):
    """(images, labels) batches of one split, in order, through the evaluation transform: on `device` from uint8
    (DeviceBatches) when one is given and the dataset is in memory, else per image in DataLoader workers."""
    if device is not None and dataset in IN_MEMORY:
        return DeviceBatches(ds, dataset, image_size, batch_size, device)
    return DataLoader(Transformed(ds, eval_transform(dataset, image_size)), batch_size=batch_size,
                      num_workers=workers, worker_init_fn=_workers_ignore_signals)


def eval_loaders(data, dataset, image_size, batch_size, workers, device=None):
    """eval_batches of the bank (labelled train) and eval splits."""
    return tuple(eval_batches(ds, dataset, image_size, batch_size, workers, device) for ds in (data.bank, data.eval))


def use_device_data(augment, dataset):
    """--augment auto/batched: in-memory datasets are held and transformed on the training device."""
    return augment != "per-image" and dataset in IN_MEMORY


# ----------------------------------------------------------------------------------------------------------------
# Device
# ----------------------------------------------------------------------------------------------------------------
def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    if name == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 matmuls (the MHE Gram, k-NN) on TF32 tensor cores
        torch.backends.cudnn.benchmark = True       # batch shapes never change: time cuDNN's convolutions once
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def place(model, device, compile=False):
    """Move a model to the device (channels_last on CUDA) and optionally torch.compile it in place (parameter names
    and so checkpoints stay the same)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model


def to_device(x, device):
    if device.type == "cuda":
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_path(path):
    """Accept a checkpoint file or a run folder holding last.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path):
    """Read one of our checkpoints with weights_only=True: no pickled code runs. The known bypasses of that guard
    (CVE-2025-32434, fixed in torch 2.6; CVE-2026-24747, fixed in 2.10) are why requirements.txt asks for
    torch >= 2.10."""
    path = checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable hyperreg checkpoint ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a hyperreg checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    return ckpt


def megabytes(n):
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.1f} kB"


def tensor_bytes(obj):
    """The bytes of every tensor in a nested dict/list: about the size of the checkpoint torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def nearest_existing(path):
    """`path` if it exists, else its nearest existing parent."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(folder):
    """Bytes free on the file system of `folder` (or of its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(folder)).free


@contextlib.contextmanager
def writing(path, size=0):
    """Turn a failed write of `path` (a full disk, a quota, a read-only file system) into a UserError that names
    its folder and, when the disk is full, the space needed (`size` bytes: the file being written)."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save reports a write that failed part-way as RuntimeError
        os_error = e if isinstance(e, OSError) else e.__context__  # torch.save's RuntimeError wraps the OSError
        if not isinstance(os_error, OSError):
            raise  # not a failed write
        free = free_space(path.parent)
        if os_error.errno in (errno.ENOSPC, errno.EDQUOT) or free < size:
            reason = (f"no space left in {path.parent}: {path.name} needs about {megabytes(size)}, "
                      f"{megabytes(free)} free")
        else:
            reason = f"cannot write {path} ({os_error.strerror or os_error})"
        raise UserError(reason, exit_code=1) from e


def save_atomic(obj, path):
    """Write to a temporary file, flush to disk, then rename: a crash never leaves a half-written checkpoint. A
    write that fails (full disk) removes the temporary file, keeps the previous file and raises UserError."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path, tensor_bytes(obj)):
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_weights(module, state, path):
    """module.load_state_dict(state); a checkpoint whose weights do not fit the model built from its own settings
    is a UserError, not a size-mismatch traceback."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"{path} is inconsistent with its settings: it holds a model of another shape than this "
                        f"version builds: {lines[-1] if lines else type(e).__name__}") from e


def write_text_atomic(path, text):
    """A small text file (args.json, metrics.jsonl) replaced atomically: a temporary file, then a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        tmp.write_text(text)
        os.replace(tmp, path)


def save_json(obj, path):
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def rng_states(device):
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def encoder_state(model):
    """The online encoder's weights, loadable into the torchvision ResNet with the same stem and fc = Identity."""
    return {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}


def encoder_from_checkpoint(ckpt, source="the checkpoint"):
    """Rebuild the online encoder f_theta stored in any method's checkpoint (read from `source`)."""
    encoder, dim = encoder_for(ckpt["args"])
    prefix = "encoder."
    load_weights(encoder, {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)},
                 source)
    return encoder, dim


# ----------------------------------------------------------------------------------------------------------------
# Many processes: torchrun + torch.distributed. A plain `python script.py` is one process and none of this runs.
# Every process holds the whole model and takes its share of each global micro-batch. The global loss is the mean
# of the processes' losses: per-sample terms are local batch means, batch-wide terms (Eq. 1, Eq. 2) see the rows of
# all processes through `gather`, whose backward (like every torch.distributed.nn collective) carries each
# process's gradient back to the process that made the rows. So after backward, the mean of the processes'
# gradients (`average_gradients`) is the gradient of the global batch, and LARS and the EMA, run on every process
# from the same gradient, keep the parameters bit-identical across processes.
# ----------------------------------------------------------------------------------------------------------------
DIST_TIMEOUT = datetime.timedelta(hours=2)  # others wait while rank 0 runs the k-NN monitor (NCCL default: 10 min)


def launched_world_size():
    """W before joining the process group: the number of processes torchrun started (its WORLD_SIZE); 1 for a
    plain `python script.py`."""
    return world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def under_torchrun():
    return "WORLD_SIZE" in os.environ


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """Rank 0 alone writes the run folder, metrics.jsonl, checkpoints and progress bars, and evaluates."""
    return rank() == 0


def init_distributed(device_name):
    """The training device; under torchrun also join the process group (NCCL on CUDA, one GPU per process at
    LOCAL_RANK; gloo on the CPU). Joins once: a group the caller already set up is kept."""
    device = resolve_device(device_name)
    if not under_torchrun():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise UserError(f"process {local} of this machine has no GPU ({torch.cuda.device_count()} visible): "
                            f"start at most that many with torchrun --nproc_per_node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT, device_id=device if cuda else None)
    return device


def end_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather(x):
    """The rows of x (B, ...) of every process in rank order, (W * B, ...): the global batch, for the batch-wide
    terms. Gradients flow back to each process's own rows (torch.distributed.nn's all_gather). x in one process."""
    if world_size() == 1:
        return x
    return torch.cat([_ContiguousGrad.apply(part) for part in dist_nn.all_gather(x)])


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands a contiguous gradient to all_gather's backward: its gloo reduction reads
    the gradient's memory as laid out, so the slice of a transposed gradient came back wrong."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def average_gradients(params):
    """Replace each gradient by its mean over the processes: one all_reduce of all gradients flattened together
    (after the last micro-batch only, so accumulation communicates once per optimizer step)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads]).div_(world_size())
    dist.all_reduce(flat)
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view(g.shape))


def process_mean(values):
    """The mean over the processes of a {name: scalar tensor} dict (the logged loss terms), in one all_reduce."""
    if world_size() == 1 or not values:
        return values
    stacked = torch.stack([v.float() for v in values.values()]).to(_collective_device())
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).to(next(iter(values.values())).device).unbind()))


def agreed_signal(signum, sync):
    """The stop signal every process acts on. One process: its own. Many: the largest any process received,
    agreed on (one small all_reduce) only where `sync` is true on every process, else None."""
    if world_size() == 1:
        return signum
    if not sync:
        return None
    t = torch.tensor([signum or 0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def from_rank0(obj):
    """Rank 0's value of a picklable object on every process (e.g. a run folder named after the time)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_model(model):
    """Rank 0's parameters and buffers on every process, as DistributedDataParallel starts (in place)."""
    if world_size() > 1:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:  # not state_dict(): it may hold non-tensor extra state
                dist.broadcast(t, src=0)


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (e.g. a dataset download), the others after it has finished."""
    if world_size() > 1 and not is_main():
        dist.barrier()
    yield
    if world_size() > 1 and is_main():
        dist.barrier()


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch of all processes, what nn.SyncBatchNorm
    does on CUDA, written out for the devices it does not run on (the CPU, gloo). The sums are added up by
    torch.distributed.nn's all_reduce, whose backward sums each process's gradient back to every process."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        if world_size() == 1 or not (self.training or self.running_mean is None):
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * world_size()
        mean = dist_nn.all_reduce(x.sum(dims)) / count
        var = dist_nn.all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / count  # biased: normalises the batch
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * count / (count - 1), m)  # unbiased, as BatchNorm keeps it
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(model, device):
    """--sync-bn: every BatchNorm of the model (online and target) normalises over the global batch:
    nn.SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere. In place, keeping the same parameters and buffers, so
    state_dict keys and checkpoints stay those of plain BatchNorm."""
    cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
    for parent in list(model.modules()):
        for name, bn in parent.named_children():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and not isinstance(bn, cls):
                new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
                if bn.affine:
                    new.weight, new.bias = bn.weight, bn.bias
                if bn.track_running_stats:
                    new.running_mean, new.running_var = bn.running_mean, bn.running_var
                    new.num_batches_tracked = bn.num_batches_tracked
                setattr(parent, name, new.train(bn.training))
    return model


def check_world(args, world):
    """Each of W processes takes batch / (W x accum) images per micro-batch: W must divide the micro-batch."""
    micro = args.batch_size // args.accum_steps
    if micro % world:
        raise UserError(f"--batch-size {args.batch_size} over --accum-steps {args.accum_steps} gives micro-batches "
                        f"of {micro} images, which {world} processes cannot share equally")
    if world > 1 and args.batchnorm and getattr(args, "sync_bn", None) is False and micro // world < 2:
        raise UserError(f"--no-sync-bn with {world} processes gives each {micro // world} image per micro-batch: "
                        f"BatchNorm needs at least 2 (drop --no-sync-bn, or a larger --batch-size)")


# ----------------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------------
def train_step(model, optimizer, loss_fn, micro_batches, accum_steps, device):
    """One optimizer step over `accum_steps` micro-batches (Section 5.1: gradients averaged over N consecutive
    micro-batches before the update). Each micro-batch loss is scaled by 1/N, so the summed gradient is the
    gradient of the mean loss over the whole batch; under torchrun the gradients are then averaged over the
    processes (see "Many processes"). Returns this process's batch-mean of each logged term (on device)."""
    totals = {}
    for _ in range(accum_steps):
        views = next(micro_batches)  # (x1, x2) for most methods, (x1, ..., xM) for multi-view ones
        with autocast(device):
            loss, terms = loss_fn(model, *(to_device(x, device) for x in views))
        (loss / accum_steps).backward()
        for name, value in {"loss": loss, **terms}.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float() / accum_steps
    average_gradients([p for group in optimizer.param_groups for p in group["params"]])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def _workers_ignore_signals(worker_id):
    # Only the main process reacts to Ctrl-C / SIGTERM; a worker killed by them would crash the loader instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def ending_workers(loader):
    """On an error, end the workers a DataLoader with persistent workers keeps (they ignore SIGTERM, so nothing else
    would end them and the process could not exit)."""
    try:
        yield
    except BaseException:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
        raise


class StopSignal:
    """SIGTERM (cluster pre-emption) and Ctrl-C set a flag; the loop finishes its step, saves and exits."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_writable(path, what):
    """UserError unless `path` (a file or folder, existing or not) can be written, checked before any work: its
    nearest existing folder must be a folder and writable (os.access also sees a read-only file system)."""
    path, existing = Path(path), nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable ({existing} is read-only for us)")


def check_run_folder(args, method):
    """The run folder, checked before any work and not yet created: a new or empty folder we can write to, or the
    folder of the run being resumed. A folder holding anything else is never written into."""
    if args.out_dir is None:
        args.out_dir = from_rank0(str(Path("runs") / f"{method}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {out} is a file, not a folder")
    if not args.resume and out.is_dir() and any(out.iterdir()):
        if (out / "last.pt").exists():
            raise UserError(f"{out} already holds a run (last.pt); resume it with --resume {out} "
                            f"or choose another --out-dir")
        names = sorted(p.name for p in out.iterdir())
        raise UserError(f"{out} is not empty ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}); a new run "
                        f"needs a new or empty --out-dir")
    check_writable(out, "the run folder")
    return out


def trim_metrics(path, epochs_done):
    """On resume, keep only the metrics.jsonl rows of the epochs the checkpoint records as done. A row is written
    before the checkpoint that records its epoch, so a run killed between the two has a row for an epoch it trains
    again (dropped here, written again) and never lacks one; a line torn by a kill is dropped too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("epoch", math.inf) <= epochs_done:
                keep.append(line + "\n")
    write_text_atomic(path, "".join(keep))


def append_metrics(path, row):
    line = json.dumps(row) + "\n"
    with writing(path, len(line)), open(path, "a") as f:
        f.write(line)


def is_out_of_memory(e):
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


@contextlib.contextmanager
def out_of_memory(advice):
    """Turn running out of memory into a UserError: 'out of memory <advice()>' (advice names what to lower)."""
    try:
        yield
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(f"out of memory {advice()}") from None


def pretrain(args, model, loss_fn, *, views, after_step=None, objective=""):
    """The self-supervised training loop shared by every method.

    model        nn.Module with an online encoder at `model.encoder` (the one evaluated and exported)
    loss_fn      (model, x1, x2) -> (loss, {name: scalar tensor}); the loss and each named term are logged;
                 with M views, (model, x1, ..., xM)
    views        ((blur_p, solarize_p[, jitter[, jitter_p]]) of view 1, of view 2, ...): Appendix B.5 augmentation
                 probabilities and, optionally, the colour jitter and its probability (default JITTER, BYOL's, with
                 p = JITTER_P); one entry per view made of each image (two for every method of the paper)
    after_step   (model, step, total_steps) -> {name: float}, called once per optimizer step (e.g. the EMA)
    Returns 0 when training finished, 128 + signal number when it was stopped by a signal (checkpoint saved).
    """
    check_world(args, launched_world_size())  # before joining the process group: every process fails alone
    device = init_distributed(args.device)
    out = check_run_folder(args, args.method)  # before any work; created below
    with rank0_first():  # one download
        data = load_data(args.dataset, args.data_dir, args.eval_split, args.subset)  # fails before anything is written
    micro = args.batch_size // args.accum_steps
    steps_per_epoch = len(data.pretrain) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(data.pretrain)} training images")
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    peak_lr = scaled_lr(args.base_lr, args.batch_size)  # Appendix B.2: LR = LR_base * BatchSize / 256

    if is_main():
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
    synced = world_size() > 1 and getattr(args, "sync_bn", None) is not False
    if synced:
        sync_batchnorm(model, device)
    place(model, device, args.compile)
    optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=0.0, weight_decay=args.weight_decay)
    step, start_epoch, partial, saved = 0, 0, {}, None  # saved: (epoch, step) of the last.pt on disk
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        load_weights(model, ckpt["model"], args.resume)  # e.g. written before the heads' last Linear lost its bias
        load_weights(optimizer, ckpt["optimizer"], args.resume)
        step, start_epoch, saved = ckpt["step"], ckpt["epoch"], (ckpt["epoch"], ckpt["step"])
        partial = ckpt.get("partial_epoch", {})  # the running sums of an epoch stopped part-way
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        if is_main():
            trim_metrics(out / "metrics.jsonl", start_epoch)
            if ckpt["args"]["epochs"] != args.epochs:  # --epochs changed the plan: args.json says so
                save_json(vars(args), out / "args.json")
                old = out / "encoder.pt"  # the shorter run's final encoder: kept, but no longer called final
                if old.exists():
                    old.rename(out / f"encoder-epoch{start_epoch}.pt")
                    print(f"# {old} of the {start_epoch}-epoch run is now {old.name[:-3]}-epoch{start_epoch}.pt")
            print(f"# resumed from {args.resume} at epoch {start_epoch}, step {step}")
    elif is_main():
        print_run(args, objective)
        save_json(vars(args), out / "args.json")
    broadcast_model(model)
    if world_size() > 1 and is_main():
        print(f"# {world_size()} processes ({dist.get_backend()}): {micro // world_size()} images each per "
              f"micro-batch, BatchNorm over {'all processes (--sync-bn)' if synced else 'each process'}")

    sampler = EpochBatches(len(data.pretrain), micro, steps_per_epoch, args.accum_steps, args.seed, rank(),
                           world_size())
    on_device = use_device_data(args.augment, args.dataset)
    if on_device:
        loader = DeviceViews(uint8_images(data.pretrain).to(device), sampler, args.dataset, args.image_size, views)
    else:
        train_set = Views(data.pretrain, *(ssl_augmentation(args.dataset, args.image_size, *v) for v in views))
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                            pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                            worker_init_fn=_workers_ignore_signals)
    bank_loader, eval_loader = eval_loaders(data, args.dataset, args.image_size, 512, args.workers,
                                            device if on_device else None) if is_main() else (None, None)
    stop = StopSignal()

    def on_disk():
        if saved is None:
            return f"no checkpoint was written yet ({out} holds no last.pt)"
        return f"the last checkpoint {out / 'last.pt'} (step {saved[1]}) is intact; continue with --resume {out}"

    @contextlib.contextmanager
    def saving():  # a write failed: say what is on disk, exit with the signal's status when one was being handled
        try:
            yield
        except UserError as e:
            raise UserError(f"{e}; {on_disk()}", exit_code=128 + stop.signum if stop.signum else e.exit_code) from None

    def checkpoint(epoch, partial_epoch=None):
        nonlocal saved
        if is_main():
            state = {"format": CHECKPOINT_FORMAT, "method": args.method, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                     "rng": rng_states(device), "args": vars(args), "argv": sys.argv}
            if partial_epoch:
                state["partial_epoch"] = partial_epoch
            with saving():
                save_atomic(state, out / "last.pt")
        saved = (epoch, step)

    def check_finite(loss_sum, where):
        if not math.isfinite(loss_sum):
            raise UserError(f"non-finite loss ({loss_sum}) {where}; stopped without saving: {on_disk()}")

    def stopped(signum):
        if is_main():
            print(f"stopped by signal {signum} at step {step}; saved {out / 'last.pt'}; continue with --resume {out}",
                  file=sys.stderr)
        return 128 + signum

    def memory_advice(what, lower):
        return lambda: f"{what}: lower {lower}; {on_disk()}"

    with stop, ending_workers(loader):
        for epoch in range(start_epoch, args.epochs):
            start_step = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            sampler.set_epoch(epoch, start_step)
            model.train()
            # The epoch's running sums (the processes' mean), restored when it was stopped part-way: its row is then
            # the uninterrupted run's.
            sums = {k: v.to(device) for k, v in partial.get("sums", {}).items()}
            counted, t0, extra = partial.get("steps", 0), time.time() - partial.get("seconds", 0.0), {}
            partial = {}
            bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{args.epochs}",
                       dynamic_ncols=True, mininterval=1.0, leave=False, disable=not is_main())
            batches = iter(loader)
            for _ in range(start_step, steps_per_epoch):
                lr = lr_at(step, total_steps, warmup_steps, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with out_of_memory(memory_advice("while training", "--batch-size (or raise --accum-steps) or "
                                                                   "--image-size")):
                    terms = train_step(model, optimizer, loss_fn, batches, args.accum_steps, device)
                extra = after_step(model, step, total_steps) if after_step else {}
                step += 1
                counted += 1
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value
                bar.update(1)
                done = step - epoch * steps_per_epoch - start_step
                signum = agreed_signal(stop.signum, done % args.log_every == 0)
                if done % args.log_every == 0 or signum:  # reading the loss synchronises: only now and then
                    mean = process_mean(sums)["loss"].item() / counted
                    check_finite(mean, f"at step {step}")
                    speed = counted * args.batch_size / (time.time() - t0)
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.3g}", img_s=f"{speed:.0f}",
                                    **{k: f"{v:.5f}" for k, v in extra.items()})
                if signum and step < (epoch + 1) * steps_per_epoch:  # at an epoch's end: finish it first
                    bar.close()
                    sums = process_mean(sums)
                    checkpoint(epoch, {"sums": {k: v.detach().cpu() for k, v in sums.items()}, "steps": counted,
                                       "seconds": time.time() - t0})
                    return stopped(signum)
            bar.close()
            seconds = time.time() - t0
            sums = process_mean(sums)
            row = {"epoch": epoch + 1, "step": step, **{k: v.item() / counted for k, v in sums.items()},
                   "lr": lr, **extra, "seconds": round(seconds, 3),
                   "images_per_s": round(counted * args.batch_size / seconds, 1)}
            check_finite(row["loss"], f"in epoch {epoch + 1}")
            evaluate = epoch + 1 == args.epochs or (args.knn_every and (epoch + 1) % args.knn_every == 0)
            if evaluate and is_main():  # the other processes wait in agreed_signal below
                t1 = time.time()
                with out_of_memory(memory_advice("in the k-NN evaluation", "--image-size or --analysis-samples")):
                    row["knn_top1"] = knn_accuracy(model.encoder, bank_loader, eval_loader, data.num_classes,
                                                   device, args.knn_k, args.knn_t)
                    if args.analysis_samples:
                        images = analysis_images(data.eval, args.analysis_samples)
                        row.update(representation_analysis(model, images, args.dataset, args.image_size, views,
                                                           getattr(args, "pow", None) or "a2", device, args.workers,
                                                           on_device))
                row["eval_seconds"] = round(time.time() - t1, 3)
            if is_main():  # the row first: a kill between the two leaves a row the resume writes again, never a gap
                with saving():
                    append_metrics(out / "metrics.jsonl", row)
            checkpoint(epoch + 1)
            if is_main():
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            signum = agreed_signal(stop.signum, True)
            if signum:
                return stopped(signum)
    if is_main():
        with saving():
            save_atomic(encoder_state(model), out / "encoder.pt")
        print(f"done: {out / 'last.pt'} (full run), {out / 'encoder.pt'} (torchvision ResNet weights)")
    return 0
