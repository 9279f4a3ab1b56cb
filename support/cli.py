"""The command line: argparse types that check a number on its flag's own line, the flags every script shares,
the presets keyed by (dataset, epochs), and what may change on --resume. Plain argparse; hand-written only where
argparse has no word for it (a one-line error, a number's range, the flags given on this command line)."""
import argparse
import math
import os
import sys

from common import ARCHS, DATASET_NAMES, DATASETS, IN_MEMORY
from support.distributed import under_torchrun
from support.errors import UserError
from support.runs import RESUME_MAY_CHANGE, checkpoint_path, load_checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Numbers, checked on the flag's own line: `type=positive_int`. A flag left at None (filled later from a preset) is
# not checked (argparse applies a type only to what is written); presets are ours and trusted.
# ----------------------------------------------------------------------------------------------------------------
def number(parse, test, what):
    """An argparse type: parse the text, refuse a value that fails `test`; argparse prints the one-line error
    'argument --flag: must be <what>, got <text>'."""
    def check(text):
        value = parse(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    check.__name__ = parse.__name__  # a text that is no number reads "invalid int value: 'x'"
    return check


positive_int = number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative_float = number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
finite_float = number(float, math.isfinite, "a finite number")
unit_interval = number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
# Ours: below 8 px a crop holds almost nothing and the ResNet's strided layers reduce it to a single pixel.
image_size = number(int, lambda v: v >= 8, "an integer >= 8 (pixels)")
analysis_samples = number(int, lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2 (the measures compare pairs)")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def as_written(value):
    """A value as it is written on the command line: a tuple as 1,40,40 (not (1.0, 40.0, 40.0))."""
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown as they are written on the command line: none for a switch (--no-batchnorm's default is to
    keep BatchNorm) or a default filled from a preset, and a tuple as 1,40,40."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0:
            return action.help
        if isinstance(action.default, tuple):
            return f"{action.help} (default: {as_written(action.default)})"
        return super()._get_help_string(action)


def data_parent():
    """The data flags of every script (`parents=[data_parent()]`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASET_NAMES, metavar="{" + ",".join(DATASET_NAMES) + "}",
                   help="cifar10/cifar100/stl10 are downloaded by torchvision into --data-dir; imagenet and folder "
                        "read <data-dir>/train and <data-dir>/val with ImageFolder")
    g.add_argument("--data-dir", default="./data", help="where datasets live (and are downloaded to)")
    g.add_argument("--image-size", type=image_size, default=None,
                   help="resolution: 32 for CIFAR, 64 for STL-10 (Appendix B.5.2), 224 for imagenet/folder "
                        "(Appendix B.5.1)")
    g.add_argument("--eval-split", default="test", choices=("val", "test"),
                   help="val: the held-out split of Appendix B.4 (pre-training then uses the rest of the train set; "
                        "for tuning); test: the official test split (for reporting)")
    g.add_argument("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes")
    g.add_argument("--augment", default="auto", choices=("auto", "batched", "per-image"),
                   help="batched: the uint8 split lives on the training device and the views of a batch are made "
                        "there, parameters drawn per image (cifar10/cifar100/stl10 only; support/batched_views.py); "
                        "per-image: torchvision transforms in DataLoader workers (common.ssl_augmentation); auto: "
                        "batched where possible")
    g.add_argument("--subset", type=positive_int, default=None, metavar="N",
                   help="use only the first N images of each split: a quick smoke run, not a result")
    return p


def run_parent():
    """The device, the seed and the weighted k-NN of every script that trains or evaluates (`parents=[...]`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto picks cuda when available; cuda runs in bf16 autocast with channels_last")
    g.add_argument("--seed", type=non_negative_int, default=0,
                   help="the initialisation, the order of the batches and their views")
    g.add_argument("--knn-k", type=positive_int, default=200,
                   help="neighbours of the weighted k-NN (InstDisc; Table 1's k-NN is DINO's protocol: 20)")
    g.add_argument("--knn-t", type=positive_float, default=0.1,
                   help="temperature of the k-NN vote weights exp(s/t) (Table 1, DINO's protocol: 0.07)")
    return p


def base_parser():
    """Flags shared by every pre-training script (used as `parents=[base_parser()]`).

    Flags whose default is None are filled from the method's preset table (see `apply_presets`)."""
    p = argparse.ArgumentParser(add_help=False, parents=[data_parent(), run_parent()])
    g = p.add_argument_group("model (Appendix B.1)")
    g.add_argument("--arch", default=None, choices=tuple(ARCHS), help="encoder (default: preset)")
    g.add_argument("--stem", default="auto", choices=("auto", "cifar", "imagenet"),
                   help="auto: the CIFAR stem (3x3 conv, stride 1, no max-pool) for cifar10/cifar100, as Appendix B.1 "
                        "says; torchvision's stem for stl10, imagenet and folder")
    g.add_argument("--no-batchnorm", dest="batchnorm", action="store_false",
                   help="remove every BatchNorm from the encoder and the MLP heads (Table 4, 'BN x')")
    g.add_argument("--no-zero-init-residual", dest="zero_init_residual", action="store_false",
                   help="start each residual block's last BatchNorm scale at one, as the first author's code does; "
                        "by default it starts at zero, as in official BYOL's and SimCLR's ResNets (Section 3.6 "
                        "follows BYOL)")

    g = p.add_argument_group("optimisation (Appendix B.2)")
    g.add_argument("--epochs", type=positive_int, default=None,
                   help="pre-training epochs (default: preset); also picks the preset row")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="the paper's batch size per optimizer step (default: preset); under torchrun the global "
                        "batch: each of W processes takes batch/(W x accum-steps) images per micro-batch")
    g.add_argument("--accum-steps", type=positive_int, default=1,
                   help="split each batch into N micro-batches and accumulate their gradients (Section 5.1). "
                        "BatchNorm statistics are computed per micro-batch of batch-size/N images")
    g.add_argument("--base-lr", type=positive_float, default=None, help="LR_base; LR = LR_base * batch-size / 256")
    g.add_argument("--weight-decay", type=non_negative_float, default=None,
                   help="LARS weight decay on weights (not biases/BN)")
    g.add_argument("--warmup-epochs", type=non_negative_float, default=10, help="linear LR warm-up (Appendix B.2)")

    g = p.add_argument_group("run folder and monitor")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    g.add_argument("--out-dir", default=None,
                   help="run folder, new or empty (default: runs/<method>-<dataset>-<time>)")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue the run saved in this last.pt (or its run folder) with its own settings; only "
                        "--device, --workers, --data-dir and --sync-bn may be given with it (and the number of "
                        "processes may change), and --epochs N to extend the run (the LR and tau cosines then "
                        "follow an N-epoch run from the resumed step on)")
    g.add_argument("--knn-every", type=non_negative_int, default=5,
                   help="weighted k-NN accuracy every N epochs and at the end (0: only at the end)")
    g.add_argument("--analysis-samples", type=analysis_samples, default=1024,
                   help="eval images (drawn once with a fixed seed over the whole eval split) for the uniformity "
                        "analysis logged with each k-NN evaluation as eval_uniformity, eval_alignment, "
                        "eval_mhe_<sub-network>, eval_energy_<ResNet block> (Figs. 4, 5) and eval_mmd_legendre "
                        "(SFRIK's MMD); 0 turns it off")
    g.add_argument("--log-every", type=positive_int, default=20, help="refresh the progress bar every N steps")

    g = p.add_argument_group("many GPUs (torchrun --nproc_per_node W script.py ...; docs/many-gpus.md)", """\
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


def method_parser(description, presets, source):
    """A method script's parser: the shared flags, and its preset table (from `source`) in --help's epilog."""
    return Parser(description=description, formatter_class=HelpFormatter, parents=[base_parser()],
                  epilog=preset_epilog(presets, source))


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
    rows = [f"  {d:<9} {e:>5} epochs: " + ", ".join(f"{k}={as_written(v)}" for k, v in row.items())
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
    check_augment(args.augment, args.dataset)


def check_augment(augment, dataset):
    if augment == "batched" and dataset not in IN_MEMORY:
        raise UserError(f"--augment batched needs an in-memory dataset ({', '.join(IN_MEMORY)}), not {dataset}")




def given_flags(parser, argv):
    """The dests of the flags written on this command line (not those left at their defaults)."""
    unset, parse = object(), argparse.ArgumentParser.parse_args  # argparse's own: no number checks of `unset`
    names = vars(parse(parser, argv))
    given = vars(parse(parser, argv, argparse.Namespace(**dict.fromkeys(names, unset))))
    return {k for k, v in given.items() if v is not unset}


def check_saved_settings(parser, saved, path, presets=None, skip=(), only=None):
    """The settings a checkpoint holds (`saved`, its args) through the checks of the command line: each value of a
    flag of `parser` (of those in `only`, when given) but those in `skip` (given again on this command line),
    written out as text, through the flag's own type and choices; a switch must be True or False. None passes only
    for a flag whose default is None that no preset fills (a new run never saves None there). A setting the command
    line would refuse is one line naming the checkpoint and the flag. Settings the flags do not know (method,
    preset) and flags a checkpoint of an older version lacks are left alone."""
    if not isinstance(saved, dict):
        raise UserError(f"{path} holds no settings (its 'args' is a {type(saved).__name__})")
    table = (presets or {}).get(saved.get("dataset"), {}) if isinstance(saved.get("dataset"), str) else {}
    filled = {"epochs", "image_size", "arch", *(k for row in table.values() for k in row)}
    for action in parser._actions:
        if not action.option_strings or action.dest not in saved or action.dest in skip or \
                (only is not None and action.dest not in only):
            continue
        value, flag = saved[action.dest], action.option_strings[0]
        if value is None and action.default is None and action.dest not in filled:
            continue
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        try:
            if action.nargs == 0:  # a switch (store_true/false, --sync-bn/--no-sync-bn)
                reason = "" if isinstance(value, bool) else "not True or False"
            else:
                parsed = action.type(text) if action.type is not None else text
                reason = "" if parsed == (tuple(value) if isinstance(value, list) else value) else \
                    f"saved as {type(value).__name__} {value!r}"  # e.g. the text "10", not the number 10
                if not reason and action.choices is not None and parsed not in action.choices:
                    reason = f"not one of {', '.join(map(str, action.choices))}"
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            reason = str(e)
        if reason:
            raise UserError(f"{path} holds a setting the command line refuses: {flag} {text} ({reason})")


def resume_settings(parser, argv, args, method, presets=None):
    """The settings of the run being resumed. --device, --workers, --data-dir and --sync-bn may change; --epochs N
    extends the run to N epochs: from the resumed step on, the LR cosine and the EMA tau schedule are those of an
    N-epoch run (the steps already taken keep theirs), so extending a finished run raises the LR again from the end
    of its old cosine to the N-epoch cosine's value at that step. Any other flag is refused."""
    path = checkpoint_path(args.resume)
    ckpt = load_checkpoint(path)
    saved = ckpt.get("args")
    given = given_flags(parser, argv) - {"resume"}
    check_saved_settings(parser, saved, path, presets, skip=given & set(RESUME_MAY_CHANGE))
    if saved.get("method") != method:
        raise UserError(f"{path} is a {saved.get('method')} run; resume it with {saved.get('method')}.py")
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
    resumed = argparse.Namespace(**{**saved, **keep, "resume": str(path), "out_dir": str(path.parent)})
    try:
        check_args(resumed)  # the checks across flags, as for a new run
    except UserError as e:
        raise UserError(f"{path} holds settings the command line refuses: {e}") from None
    except AttributeError as e:  # a checkpoint that lacks a setting every version saved
        raise UserError(f"{path} holds no {e.name} setting") from None
    return resumed


def parse_args(parser, argv, presets, method):
    """Parse (numbers checked by Parser), restore the settings of a run being resumed, fill presets, check."""
    args = parser.parse_args(argv)
    if getattr(args, "sync_bn", None) and not under_torchrun():
        raise UserError("--sync-bn needs torchrun (one process already normalises over the whole batch)")
    if args.resume:
        args = resume_settings(parser, argv, args, method, presets)
    else:
        args.method = method
        apply_presets(args, presets)
        check_args(args)
    if getattr(args, "sync_bn", None):
        args.sync_bn = None  # --sync-bn is the default where it is allowed (torchrun): saved as the default
    return args


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


def legendre_weights(text):
    """--legendre-weights: comma-separated b_1,b_2,... >= 0 (a positive-definite kernel, Schoenberg's theorem)."""
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers b_1,b_2,..., e.g. 1,40,40")
    if any(not w >= 0 or math.isinf(w) for w in weights):
        raise argparse.ArgumentTypeError(f"{text!r}: every b_l must be a finite number >= 0 (a kernel with a "
                                         f"negative weight is not positive definite)")
    if not any(weights):
        raise argparse.ArgumentTypeError(f"{text!r}: every b_l is 0, so the kernel and the MMD are 0 and the "
                                         f"regulariser does nothing; to turn it off, give its weight as 0 "
                                         f"(--unif-weight 0, --mmd-weight 0)")
    return weights
