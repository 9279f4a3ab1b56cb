"""Your runs beside the paper's numbers: every table of the paper that your run folders cover, and its figures.

    python results.py runs/                   # the tables, ours beside the paper's (markdown on stdout)
    python results.py runs/ --out results/    # also results/results.md, *.csv and the figures as PNG

A run folder is what the training scripts write (args.json, metrics.jsonl, last.pt, encoder.pt at the end) plus
the linear_eval_<split>[-N].json files of linear_eval.py. A run belongs to a row of the paper when its settings,
apart from --seed and the flags that do not change what is trained (--device, --workers, --knn-k, ...), are the
row's: the settings that differ from the method's preset for the run's --dataset and --epochs, read with the
method's own parse_args. Runs of one row are averaged over seeds (mean, sample standard deviation). Runs that are
not finished are listed apart and never averaged in; runs that match no row of the paper go to "Other runs".

The uniformity family side by side: runs that share a recipe (dataset, encoder, image size, epochs, batch and the
k-NN/analysis monitor) and are of two methods or more form a table, one row per method, setting and linear probe
protocol (seeds averaged), with the paper's measures (linear top-1/top-5, k-NN, eval_uniformity, eval_mmd_legendre,
eval_alignment, the projector's MHE, images/s); with --out also its alignment-uniformity plane and its curves
(family<N>_plane.png, family<N>_curves.png). docs/family.md gives the commands of one shared recipe.

No run is counted twice: each real folder is read once (a link, a loop or a path given twice is noted), a copy of a
run folder (the same args.json and metrics rows, e.g. cp -r run run.bak) is counted once, and different runs with
the same settings and seed are averaged in neither; all are listed under "Duplicates" with their paths. A file with
a field of the wrong type is skipped with a note (a metrics row as an unreadable line is). --out never replaces an
earlier report: when the folder holds one, the report goes to <out>-2, -3, ...
matplotlib is needed for --out only (the training scripts never import it).
"""
import contextlib
import csv
import dataclasses
import functools
import importlib
import io
import json
import math
import re
import sys
from pathlib import Path

import common
from support import cli

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------------
# The paper's numbers, each with the table it comes from
# ----------------------------------------------------------------------------------------------------------------
# Per table: title, measures (linear top-1/top-5 %, k-NN top-1 % of linear_eval.py), how many seeds the paper
# averaged, extra flags of the commands that are protocol rather than a setting, and notes.
TABLES = {
    "Table 1": dict(title="ImageNet, ResNet-50, 1000 epochs (top-1 %, k-NN %)", measures=("top1", "knn_top1"),
                    seeds=1, knn=(20, 0.07), train_extra="--data-dir <imagenet> --knn-k 20 --knn-t 0.07",
                    eval_extra=" --knn-k 20 --knn-t 0.07",
                    note="the k-NN column is DINO's protocol (k = 20, T = 0.07). Section 4 says the MHE run "
                         "regularised encoder, projector and predictor, Appendix D lists projector and predictor: "
                         "both readings are rows"),
    "Table 2": dict(title="ImageNet, ResNet-50, 300 epochs (top-1 %, top-5 %)", measures=("top1", "top5"), seeds=1,
                    train_extra="--data-dir <imagenet>", note="the MHE rows: as Table 1"),
    "Table 3": dict(title="ResNet-50, 1000 epochs (top-1 %)", measures=("top1",), seeds=1,
                    note="Section 4 sets lambda_MHE = 1 on encoder, projector and predictor; Appendices B.1 and "
                         "C.1 give 10 on projector and predictor (our default): both readings are rows"),
    "Table 4": dict(title="CIFAR-10, ResNet-18, 300 epochs: BatchNorm and MHE (top-1 %)", measures=("top1",),
                    seeds=3, note="MHE on encoder, projector and predictor when on"),
    "Table 5": dict(title="CIFAR-10, ResNet-18, 300 epochs: MHE (a2) per sub-network (top-1 %)",
                    measures=("top1",), seeds=3,
                    note="** the paper's Table 5 has lost marks in its third and fourth columns: 91.36 and 91.46 "
                         "belong to these two subsets in an order we guessed (the other reading swaps them)"),
    "Table C.6": dict(title="CIFAR-10, ResNet-18, 300 epochs: lambda_MHE, s = 2 (top-1 %)", measures=("top1",),
                      seeds=3),
    "Table C.7": dict(title="CIFAR-10, ResNet-18, 300 epochs: MHE power s (top-1 %)", measures=("top1",), seeds=3,
                      note="the paper gives a1 as 90.94 +- 0.34, half the difference of its best and worst seed"),
    "Table C.8": dict(title="CIFAR-10, ResNet-18, 300 epochs: batch 1024 from N micro-batches (top-1 %)",
                      measures=("top1",), seeds=3, note="Fig. 8 plots each method's drop from its 1024 row"),
}

NAMES = {"simclr": "SimCLR*", "byol": "BYOL*", "byol_uniformity": "BYOL + L_uni", "byol_mhe": "BYOL-MHE",
         "sfrik": "SFRIK", "msbreg": "MSBReg"}
ALL = "--mhe-on encoder,projector,predictor"
IN1K, C10, C100, STL = "--dataset imagenet", "--dataset cifar10", "--dataset cifar100", "--dataset stl10"

# The paper's numbers, one row each: (table, row, method script, the row's flags on top of the method's preset,
# {measure: number}). Measures: linear top-1 / top-5 % and k-NN top-1 % (Table 1) on the test split.
PAPER = [
    ("Table 1", "BYOL*", "byol", f"{IN1K} --epochs 1000", {"top1": 74.1, "knn_top1": 63.7}),
    ("Table 1", "BYOL-MHE (projector, predictor: App. D)", "byol_mhe", f"{IN1K} --epochs 1000",
     {"top1": 74.4, "knn_top1": 64.9}),
    ("Table 1", "BYOL-MHE (encoder too: Sec. 4)", "byol_mhe", f"{IN1K} --epochs 1000 {ALL}",
     {"top1": 74.4, "knn_top1": 64.9}),
    ("Table 2", "BYOL*", "byol", IN1K, {"top1": 71.9, "top5": 89.2}),
    ("Table 2", "BYOL-MHE (projector, predictor: App. D)", "byol_mhe", IN1K, {"top1": 72.4, "top5": 89.9}),
    ("Table 2", "BYOL-MHE (encoder too: Sec. 4)", "byol_mhe", f"{IN1K} {ALL}", {"top1": 72.4, "top5": 89.9}),
    ("Table 3", "SimCLR*, CIFAR-10", "simclr", f"{C10} --epochs 1000", {"top1": 93.81}),
    ("Table 3", "BYOL*, CIFAR-10", "byol", f"{C10} --epochs 1000", {"top1": 94.46}),
    ("Table 3", "BYOL + L_uni, CIFAR-10", "byol_uniformity", f"{C10} --epochs 1000", {"top1": 94.84}),
    ("Table 3", "BYOL-MHE, CIFAR-10", "byol_mhe", f"{C10} --epochs 1000", {"top1": 94.78}),
    ("Table 3", "BYOL-MHE (Sec. 4: lambda 1, encoder too), CIFAR-10", "byol_mhe",
     f"{C10} --epochs 1000 --mhe-weight 1 {ALL}", {"top1": 94.78}),
    ("Table 3", "SimCLR*, CIFAR-100", "simclr", f"{C100} --epochs 1000", {"top1": 70.98}),
    ("Table 3", "BYOL*, CIFAR-100", "byol", f"{C100} --epochs 1000", {"top1": 72.10}),
    ("Table 3", "BYOL + L_uni, CIFAR-100", "byol_uniformity", f"{C100} --epochs 1000", {"top1": 72.62}),
    ("Table 3", "BYOL-MHE, CIFAR-100", "byol_mhe", f"{C100} --epochs 1000", {"top1": 72.56}),
    ("Table 3", "BYOL-MHE (Sec. 4: lambda 1, encoder too), CIFAR-100", "byol_mhe",
     f"{C100} --epochs 1000 --mhe-weight 1 {ALL}", {"top1": 72.56}),
    ("Table 3", "SimCLR*, STL-10", "simclr", f"{STL} --epochs 1000", {"top1": 82.40}),
    ("Table 3", "BYOL*, STL-10", "byol", f"{STL} --epochs 1000", {"top1": 82.81}),
    ("Table 3", "BYOL + L_uni, STL-10", "byol_uniformity", f"{STL} --epochs 1000", {"top1": 83.19}),
    ("Table 3", "BYOL-MHE, STL-10", "byol_mhe", f"{STL} --epochs 1000", {"top1": 83.96}),
    ("Table 3", "BYOL-MHE (Sec. 4: lambda 1, encoder too), STL-10", "byol_mhe",
     f"{STL} --epochs 1000 --mhe-weight 1 {ALL}", {"top1": 83.96}),
    ("Table 4", "BN x, MHE x", "byol", "--no-batchnorm", {"top1": 28.76}),
    ("Table 4", "BN v, MHE x", "byol", "", {"top1": 90.74}),
    ("Table 4", "BN x, MHE v", "byol_mhe", f"--no-batchnorm {ALL}", {"top1": 45.72}),
    ("Table 4", "BN v, MHE v", "byol_mhe", ALL, {"top1": 91.22}),
    ("Table 5", "no MHE (BYOL)", "byol", "", {"top1": 90.74}),
    ("Table 5", "projector, predictor", "byol_mhe", "", {"top1": 91.64}),
    ("Table 5", "encoder, projector **", "byol_mhe", "--mhe-on encoder,projector", {"top1": 91.36}),
    ("Table 5", "encoder, predictor **", "byol_mhe", "--mhe-on encoder,predictor", {"top1": 91.46}),
    ("Table 5", "projector", "byol_mhe", "--mhe-on projector", {"top1": 91.38}),
    ("Table 5", "predictor", "byol_mhe", "--mhe-on predictor", {"top1": 91.10}),
    ("Table 5", "encoder", "byol_mhe", "--mhe-on encoder", {"top1": 90.96}),
    ("Table 5", "encoder, projector, predictor", "byol_mhe", ALL, {"top1": 91.22}),
    ("Table 5", "BYOL + L_uni", "byol_uniformity", "", {"top1": 91.48}),
    ("Table C.6", "lambda_MHE = 0.001", "byol_mhe", "--pow 2 --mhe-weight 0.001", {"top1": 90.74}),
    ("Table C.6", "lambda_MHE = 0.01", "byol_mhe", "--pow 2 --mhe-weight 0.01", {"top1": 91.12}),
    ("Table C.6", "lambda_MHE = 1", "byol_mhe", "--pow 2 --mhe-weight 1", {"top1": 91.20}),
    ("Table C.6", "lambda_MHE = 10", "byol_mhe", "--pow 2 --mhe-weight 10", {"top1": 91.34}),
    ("Table C.6", "lambda_MHE = 100", "byol_mhe", "--pow 2 --mhe-weight 100", {"top1": 91.14}),
    ("Table C.7", "BYOL (repro)", "byol", "", {"top1": 90.74}),
    ("Table C.7", "s = 0", "byol_mhe", "--pow 0", {"top1": 91.12}),
    ("Table C.7", "s = 1", "byol_mhe", "--pow 1", {"top1": 91.24}),
    ("Table C.7", "s = 2", "byol_mhe", "--pow 2", {"top1": 91.34}),
    ("Table C.7", "s = a0", "byol_mhe", "--pow a0", {"top1": 91.14}),
    ("Table C.7", "s = a1", "byol_mhe", "--pow a1", {"top1": 90.94}),
    ("Table C.7", "s = a2", "byol_mhe", "--pow a2", {"top1": 91.64}),
    ("Table C.8", "BYOL*, micro-batch 1024", "byol", "", {"top1": 90.74}),
    ("Table C.8", "BYOL*, micro-batch 512", "byol", "--accum-steps 2", {"top1": 89.10}),
    ("Table C.8", "BYOL*, micro-batch 256", "byol", "--accum-steps 4", {"top1": 87.50}),
    ("Table C.8", "BYOL*, micro-batch 128", "byol", "--accum-steps 8", {"top1": 85.00}),
    ("Table C.8", "BYOL + L_uni, micro-batch 1024", "byol_uniformity", "", {"top1": 91.48}),
    ("Table C.8", "BYOL + L_uni, micro-batch 512", "byol_uniformity", "--accum-steps 2", {"top1": 90.22}),
    ("Table C.8", "BYOL + L_uni, micro-batch 256", "byol_uniformity", "--accum-steps 4", {"top1": 86.84}),
    ("Table C.8", "BYOL + L_uni, micro-batch 128", "byol_uniformity", "--accum-steps 8", {"top1": 82.42}),
    ("Table C.8", "BYOL-MHE, micro-batch 1024", "byol_mhe", "", {"top1": 91.64}),
    ("Table C.8", "BYOL-MHE, micro-batch 512", "byol_mhe", "--accum-steps 2", {"top1": 90.02}),
    ("Table C.8", "BYOL-MHE, micro-batch 256", "byol_mhe", "--accum-steps 4", {"top1": 88.10}),
    ("Table C.8", "BYOL-MHE, micro-batch 128", "byol_mhe", "--accum-steps 8", {"top1": 85.76}),
]

# Appendix D: the linear probe of every table (80 epochs, batch 100, base LR 0.2, SGD, augmented), test split.
PAPER_PROBE = dict(eval_split="test", epochs=80, precompute=False, batch_size=100, lr=0.2, lr_scaled=True)

PROBE_NAMES = dict(eval_split="split", epochs="probe epochs", precompute="probe on", batch_size="probe batch",
                   lr="probe base LR", lr_scaled="probe LR")


def known(value):
    return "not recorded" if value is None else value


def describe_probe(name, value):
    if name == "precompute":
        return "precomputed features" if value else "augmented images (crop, flip)"
    if name == "lr_scaled":
        return "x batch / 256" if value else "unscaled (linear_eval.py before the LR scaling)"
    return value


# Keys of args.json that do not change what is trained (or that define the row elsewhere): never a row's setting.
NOT_SETTINGS = {"method", "dataset", "epochs", "seed", "preset", "device", "workers", "data_dir", "out_dir",
                "resume", "compile", "log_every", "knn_every", "knn_k", "knn_t", "analysis_samples", "augment"}
# Columns of metrics.jsonl that are not loss terms (everything else numeric is drawn in the loss curves).
NOT_LOSS = {"epoch", "step", "lr", "tau", "seconds", "images_per_s", "eval_seconds", "knn_top1"}
MEASURE_NAMES = {"top1": "top-1", "top5": "top-5", "knn_top1": "k-NN"}


# ----------------------------------------------------------------------------------------------------------------
# Settings: what distinguishes a run from its method's preset
# ----------------------------------------------------------------------------------------------------------------
def norm(value):
    """A JSON value in comparable (hashable) form: lists become tuples; a list of names (--mhe-on) is an unordered
    set; an object (no flag writes one) becomes its sorted (key, value) pairs."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), norm(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        items = tuple(norm(v) for v in value)
        return tuple(sorted(items)) if all(isinstance(v, str) for v in items) else items
    return value


def method_module(method):
    """The method's own script (byol.py, byol_mhe.py, ...) if it is here and has parse_args, else None."""
    if not isinstance(method, str) or not method.isidentifier() or not (ROOT / f"{method}.py").is_file():
        return None
    module = importlib.import_module(method)
    return module if hasattr(module, "parse_args") and hasattr(module, "build_parser") else None


@functools.lru_cache(maxsize=None)
def preset_args(method, dataset, epochs):
    """vars(args) of `python METHOD.py --dataset D --epochs E`: the preset a run is compared with; None if unknown."""
    return parsed_args(method, ("--dataset", str(dataset), "--epochs", str(epochs)))


def parsed_args(method, argv):
    return parse_outcome(method, argv)[0]


@functools.lru_cache(maxsize=None)
def parse_outcome(method, argv):
    """(vars(args), None) of `python METHOD.py ARGV`; (None, None) when the method's script is not in this checkout;
    (None, why) when the script refuses the arguments (a flag or value it does not know). argparse's own 'error:'
    line is caught, not printed: it would read as results.py's error."""
    module = method_module(method)
    if module is None:
        return None, None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return vars(module.parse_args(list(argv))), None
    except SystemExit:
        why = err.getvalue().strip().splitlines()
        return None, (why[-1].removeprefix("error: ").removesuffix(" (see --help)") if why else "refused")
    except common.UserError as e:
        return None, str(e)


def settings(args):
    """((name, value), ...) of the args that differ from the preset of the run's method, dataset and epochs (sorted);
    None when the method's script is not in this checkout."""
    preset = preset_args(args.get("method"), args.get("dataset"), args.get("epochs"))
    if preset is None:
        return None
    # --stem cifar on CIFAR is the preset's encoder (--stem auto): the same setting, so that neither its rows nor
    # its seeds are told apart from the preset's.
    args, preset = {**args, "stem": stem_of(args)}, {**preset, "stem": stem_of(preset)}
    # A key this version's parser does not know is shown (it may matter); one the run lacks predates its flag.
    return tuple(sorted((k, norm(v)) for k, v in args.items()
                        if k not in NOT_SETTINGS and (k not in preset or norm(v) != norm(preset[k]))))


def stem_of(args):
    """The stem --stem gives: auto is the CIFAR stem for CIFAR-10/100 only (Appendix B.1)."""
    return common.resolve_stem(args.get("stem", "auto"), args.get("dataset"))


def flags(method, setting):
    """The command-line flags that give `setting`, e.g. '--pow 2 --mhe-weight 0.01' or '--no-batchnorm'."""
    module = method_module(method)
    actions = {a.dest: a for a in module.build_parser()._actions} if module else {}
    out = []
    for name, value in setting or ():
        action = actions.get(name)
        if action is None:
            out.append(f"{name}={value}")
        elif action.nargs == 0:  # store_true / store_false, e.g. --no-batchnorm
            out.append(max(action.option_strings, key=len))
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            out.append(f"{max(action.option_strings, key=len)} {text}")
    return " ".join(out)


@dataclasses.dataclass
class Row:
    table: str
    label: str
    method: str
    argv: str
    paper: dict
    key: tuple = None  # (method, dataset, epochs, settings); None when this checkout cannot parse the row

    def command(self, seeds):
        info = TABLES[self.table]
        parts = [f"python {self.method}.py", self.argv, info.get("train_extra", "")]
        if seeds > 1:
            parts.append("--seed S")
        return " ".join(p for p in parts if p) + (f"  (S = {', '.join(map(str, range(seeds)))})" if seeds > 1 else "")


@functools.lru_cache(maxsize=None)
def paper_rows():
    rows = []
    for table, label, method, argv, paper in PAPER:
        row = Row(table, label, method, argv, paper)
        args = parsed_args(method, tuple(argv.split()))
        if args is not None:
            row.key = (method, args["dataset"], args["epochs"], settings(args))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Reading run folders
# ----------------------------------------------------------------------------------------------------------------
EVAL_FILE = re.compile(r"linear_eval_(?P<split>[A-Za-z0-9]+)(?:-(?P<n>\d+))?\.json$")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How an evaluation was made; fields a linear_eval JSON does not record (older versions) are None."""
    dataset: str          # the evaluation's dataset ('' when it is the pre-training dataset)
    eval_split: str
    epochs: int           # probe epochs
    precompute: bool
    batch_size: int
    lr: float             # base LR as given to linear_eval.py
    lr_scaled: bool       # trained at lr x batch / 256 (a JSON with effective_lr); older probes used lr unscaled
    knn_k: int
    knn_t: float

    def describe(self, knn=True):
        text = (f"{self.dataset + ' ' if self.dataset else ''}{self.eval_split} split; linear probe "
                f"{known(self.epochs)} epoch{'s' * (self.epochs != 1)} on "
                f"{describe_probe('precompute', self.precompute)}, batch {known(self.batch_size)}, "
                f"base LR {known(self.lr)}{'' if self.lr_scaled else ' (unscaled)'}")
        return text + (f"; k-NN k = {known(self.knn_k)}, T = {known(self.knn_t)}" if knn else "")

    def differences(self, table):
        """How this protocol differs from the paper's for `table` (empty: it is the paper's)."""
        out = [f"{PROBE_NAMES[name]} {describe_probe(name, getattr(self, name))} "
               f"(paper: {describe_probe(name, want)})" for name, want in PAPER_PROBE.items()
               if getattr(self, name) is not None and getattr(self, name) != want]
        if self.dataset:
            out.insert(0, f"evaluated on {self.dataset}, not the pre-training dataset")
        knn = TABLES[table].get("knn")
        if knn and (self.knn_k, self.knn_t) != knn:
            out.append(f"k-NN k = {known(self.knn_k)}, T = {known(self.knn_t)} (paper: k = {knn[0]}, T = {knn[1]})")
        return out


@dataclasses.dataclass
class Run:
    path: Path
    args: dict
    metrics: list
    evals: dict = dataclasses.field(default_factory=dict)  # Protocol -> the latest linear_eval JSON with it
    eval_files: dict = dataclasses.field(default_factory=dict)  # Protocol -> its file name
    name: str = ""  # the path below the folder given on the command line
    finished: bool = False
    last_epoch: int = 0
    key: tuple = None

    @property
    def method(self):
        return self.args["method"]

    @property
    def seed(self):
        return self.args.get("seed")


NUMBER = (int, float)
# The fields of a linear_eval JSON that results.py reads, and their types (None, or absent: not recorded).
EVAL_TYPES = dict(top1=NUMBER, top5=NUMBER, knn_top1=NUMBER, eval_split=str, dataset=str, epochs=int, precompute=bool,
                  batch_size=int, lr=NUMBER, effective_lr=NUMBER, knn_k=int, knn_t=NUMBER, checkpoint_epoch=int)
# The columns of a metrics row that results.py reads (and every eval_* one): numbers. The loss terms are drawn only
# where every row holds a number (figures()).
METRIC_TYPES = dict(epoch=int, step=NUMBER, knn_top1=NUMBER, images_per_s=NUMBER)


def wrong_type(row, types):
    """'name is value, not a ...' for the first field of `row` whose value is not of its type (a bool is neither a
    number nor an int), or None; a field that is absent or null is not recorded, not wrong."""
    for name, kind in types.items():
        value = row.get(name)
        if value is None:
            continue
        if not (isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)):
            what = {bool: "true or false", int: "an integer", str: "a string"}.get(kind, "a number")
            return f"{name} is {json.dumps(value)}, not {what}"
    return None


def args_problem(args):
    """Why an args.json cannot be a run's (None when it can)."""
    if not isinstance(args, dict):
        return "not a JSON object"
    if not all(isinstance(args.get(k), str) for k in ("method", "dataset")):
        return "no method or dataset"
    epochs = args.get("epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        return f"epochs is {json.dumps(epochs)}, not a positive integer"
    return wrong_type(args, {"seed": int})


def read_metrics(path, notes):
    """{epoch: row} of metrics.jsonl; lines that are not JSON (a crash cut them short) or that hold a field of the
    wrong type are ignored, with a note."""
    rows, bad, typed = {}, 0, []
    try:
        lines = (path / "metrics.jsonl").read_bytes().splitlines()
    except OSError as e:
        notes.append(f"{path}: cannot read metrics.jsonl ({e.strerror or e}); read as no epochs")
        return rows
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            epoch = row["epoch"]  # a row without its epoch is unreadable
        except (ValueError, KeyError, TypeError, IndexError):
            bad += int(bool(line.strip()))
            continue
        problem = wrong_type(row, {**METRIC_TYPES, **{k: NUMBER for k in row if k.startswith("eval_")}})
        if problem is None and (epoch is None or epoch < 1):
            problem = f"epoch is {json.dumps(epoch)}, not a positive integer"
        if problem:
            typed.append(f"line {n}: {problem}")
            continue
        rows[row["epoch"]] = row  # an epoch logged again after a resume: the later line wins
    if bad:
        notes.append(f"{path}: ignored {bad} unreadable line(s) of metrics.jsonl")
    if typed:
        notes.append(f"{path}: ignored {len(typed)} line(s) of metrics.jsonl with a field of the wrong type "
                     f"({'; '.join(typed[:3])}{'; ...' if len(typed) > 3 else ''})")
    return rows


def read_run(path, notes):
    """A Run from a folder holding args.json, or None (with a note) when the folder cannot be read as one."""
    try:
        args = json.loads((path / "args.json").read_bytes())
        problem = args_problem(args)
        if problem:
            raise ValueError(problem)
    except (OSError, ValueError) as e:
        notes.append(f"skipped {path}: unreadable args.json ({getattr(e, 'strerror', None) or e})")
        return None
    _, refused = parse_outcome(args["method"], ("--dataset", args["dataset"], "--epochs", str(args["epochs"])))
    if refused:  # the script is here, and its parser refuses the run's own dataset or epochs
        notes.append(f"skipped {path}: {args['method']}.py of this checkout refuses args.json's --dataset "
                     f"{args['dataset']} --epochs {args['epochs']} ({refused})")
        return None
    rows = read_metrics(path, notes) if (path / "metrics.jsonl").exists() else {}
    run = Run(path, args, [rows[e] for e in sorted(rows)])
    run.last_epoch = max(rows, default=0)
    # encoder.pt is written after the last epoch's checkpoint, so a run killed between its last metrics row and
    # that checkpoint (or extended with --resume --epochs) is not finished yet
    run.finished = run.last_epoch >= args["epochs"] and (path / "encoder.pt").exists()
    s = settings(args)
    run.key = (args["method"], args["dataset"], args["epochs"], s if s is not None else unknown_settings(args))
    files = sorted((m.group("split"), int(m.group("n") or 1), p) for p in path.glob("linear_eval_*.json")
                   if (m := EVAL_FILE.match(p.name)))
    for split, _, p in files:  # in order of evaluation: a later one with the same protocol replaces an earlier one
        try:
            result = json.loads(p.read_bytes())
            if not isinstance(result, dict):
                raise ValueError("not a JSON object")
            problem = wrong_type(result, EVAL_TYPES)
            if problem:
                raise ValueError(problem)
            protocol = protocol_of({"eval_split": split, **{k: v for k, v in result.items() if v is not None}},
                                   args["dataset"])
        except (OSError, ValueError) as e:
            notes.append(f"{p}: not a linear_eval result ({getattr(e, 'strerror', None) or e}), ignored")
            continue
        epoch = result.get("checkpoint_epoch")  # older results do not record it
        if epoch is not None and epoch < args["epochs"]:
            notes.append(f"{p}: evaluates the checkpoint of epoch {epoch} of {args['epochs']}, not the finished run; "
                         f"ignored")
            continue
        run.evals.pop(protocol, None)  # keep the dict in order of evaluation (result_of takes the last)
        run.evals[protocol], run.eval_files[protocol] = result, p.name
    return run


NO_SCRIPT = "(no script)"


def unknown_settings(args):
    """Without the method's script every setting is shown: the run can still be grouped over seeds."""
    return ((NO_SCRIPT, True),) + tuple(sorted((k, norm(v)) for k, v in args.items()
                                                         if k not in NOT_SETTINGS))


def protocol_of(result, train_dataset):
    dataset = result.get("dataset", train_dataset)
    return Protocol(dataset="" if dataset == train_dataset else dataset, eval_split=result["eval_split"],
                    epochs=result.get("epochs"), precompute=bool(result.get("precompute", False)),
                    batch_size=result.get("batch_size"), lr=result.get("lr"),
                    lr_scaled="effective_lr" in result, knn_k=result.get("knn_k"),
                    knn_t=result.get("knn_t"))


def find_runs(paths, notes):
    """Every run folder (a folder with args.json) under `paths`, each real folder once: a link to a folder already
    seen (a loop such as loop/self -> .), or a path given twice, is read once, with a note. Leaf folders that are
    not runs get a note. Returns the runs and the number of folders with args.json (read or skipped)."""
    runs, seen, candidates = [], {}, []  # seen: real path -> the path it was first reached by

    def visit(folder, root):
        real = folder.resolve()
        if real in seen:
            notes.append(f"{folder}: the same folder as {seen[real]} (a link, or a path given twice), read once")
            return
        seen[real] = folder
        if (folder / "args.json").is_file():
            candidates.append(folder)
            run = read_run(folder, notes)
            if run is not None:
                run.name = str(folder.relative_to(root)) if folder != root else folder.resolve().name
                runs.append(run)
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as e:
            notes.append(f"skipped {folder}: cannot list it ({e.strerror or e})")
            return
        if not children and folder != root:  # an empty root: the error below says it
            notes.append(f"skipped {folder}: not a run folder (no args.json)")
        for child in children:
            visit(child, root)

    for path in paths:
        if not path.is_dir():
            raise common.UserError(f"{path} is not a folder (give run folders or folders that hold them)")
        visit(path, path)
    return runs, len(candidates)


def content(run):
    """What a copy of a run folder (cp -r run run.bak) shares with it: args.json but for out_dir, and every metrics
    row (their seconds alone tell two trainings apart)."""
    return json.dumps([{k: v for k, v in run.args.items() if k != "out_dir"}, run.metrics], sort_keys=True)


def set_apart_duplicates(runs, notes):
    """(the runs to count, [(run set apart, [the runs it duplicates], is_copy)]). Copies of one run (the same
    content()) are counted once: the copy with the most evaluations, then the first found. Different finished runs
    with the same settings and seed are not several seeds: none of them is averaged in."""
    by_content = {}
    for run in runs:
        by_content.setdefault(content(run), []).append(run)
    kept, duplicates = [], []
    for run in runs:
        copies = by_content[content(run)]
        counted = max(copies, key=lambda r: (r.finished, len(r.eval_files)))  # the first of the best
        if run is counted:
            kept.append(run)
        else:
            duplicates.append((run, [counted], True))
            notes.append(f"{run.path}: a copy of {counted.path} (the same args.json and metrics.jsonl), counted once")
    by_seed = {}
    for run in kept:
        if run.finished:
            by_seed.setdefault((run.key, run.seed), []).append(run)
    clashes = [same for same in by_seed.values() if len(same) > 1]
    for same in clashes:
        duplicates += [(run, [r for r in same if r is not run], False) for run in same]
        notes.append(f"{', '.join(str(r.path) for r in same)}: different runs with the same settings and seed "
                     f"{same[0].seed}: none of them is averaged in (see Duplicates)")
    apart = {id(run) for same in clashes for run in same}
    return [run for run in kept if id(run) not in apart], duplicates


def duplicates_section(duplicates, report):
    if not duplicates:
        return
    report.append("## Duplicates (never counted twice)\n")
    copies = [(run, of[0]) for run, of, copy in duplicates if copy]
    if copies:
        report.append("Copies of one run (the same args.json but for out_dir, the same metrics.jsonl), counted once "
                      "as the first path:\n")
        report += md_table(["counted", "copy"], [[str(of.path), str(run.path)] for run, of in copies]) + [""]
    clashes = [(run, of) for run, of, copy in duplicates if not copy]
    if clashes:
        report.append("Different runs with the same settings and seed: not several seeds, so none of them is "
                      "averaged in (remove one, or give it another `--seed`):\n")
        report += md_table(["settings", "seed", "run", "same settings and seed as"],
                           [[f"`{group_label(run.key)}`", run.seed, str(run.path), ", ".join(str(r.path) for r in of)]
                            for run, of in clashes]) + [""]


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------
def mean_std(values):
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def fmt(stats, digits=2):
    if stats is None:
        return "-"
    mean, std = stats
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def md_table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]


def seeds_text(runs):
    return f"{len(runs)} ({', '.join(str(r.seed) for r in sorted(runs, key=lambda r: (r.seed is None, r.seed)))})"


def uses_knn(table):
    return "knn_top1" in TABLES[table]["measures"]


def project(protocol, knn):
    """The protocol as a table sees it: its k-NN settings only matter to a table with a k-NN column."""
    return protocol if knn else dataclasses.replace(protocol, knn_k=None, knn_t=None)


def protocols_of(runs, knn):
    return {project(p, knn) for r in runs for p in r.evals}


def result_of(run, protocol, knn):
    """The run's latest linear_eval result made with `protocol` (as projected), or None."""
    found = [result for p, result in run.evals.items() if project(p, knn) == protocol]
    return found[-1] if found else None


def evaluated(runs, protocol, measure, knn=True):
    """mean ± std of `measure` over the runs evaluated with `protocol`, and those runs."""
    values = [(r, (result_of(r, protocol, knn) or {}).get(measure)) for r in runs]
    done = [(r, v) for r, v in values if v is not None]
    return (mean_std([v for _, v in done]) if done else None), [r for r, _ in done]


# section "family": table is the recipe's flags, commands the training and evaluation commands of the row
CSV_FIELDS = ("section", "table", "row", "method", "settings", "protocol", "papers_protocol", "measure", "paper",
              "mean", "std", "n", "seeds", "commands")


def record(*values):
    """One line of results.csv; the last two values are (mean, std) or None and the runs averaged."""
    *head, stats, runs = values
    mean, std = stats if stats else ("", "")
    return dict(zip(CSV_FIELDS, [*head, mean, "" if std is None else std, len(runs),
                                 " ".join(str(r.seed) for r in runs)]))


def paper_order(protocols, table):
    return sorted(protocols, key=lambda p: (bool(p.differences(table)), p.describe()))


def paper_tables(groups, report, records):
    """Each paper table whose rows have finished runs: paper vs ours per protocol, and what is missing."""
    by_table = {}
    for row in paper_rows():
        by_table.setdefault(row.table, []).append(row)
    for table, rows in by_table.items():
        info = TABLES[table]
        matched = {id(row): groups.get(row.key, []) for row in rows}
        if not any(matched.values()):
            continue
        report.append(f"## {table}: {info['title']}\n")
        if info.get("note"):
            report.append(f"Note: {info['note']}.\n")
        knn = uses_knn(table)
        protocols = paper_order(protocols_of([r for runs in matched.values() for r in runs], knn), table)
        for protocol in protocols:
            differs = protocol.differences(table)
            report.append(f"Protocol: {protocol.describe(knn)}; "
                          + (f"**not the paper's**: {'; '.join(differs)}." if differs else "the paper's.") + "\n")
            header = ["row", "command"]
            for m in info["measures"]:
                header += [f"{MEASURE_NAMES[m]} paper", f"{MEASURE_NAMES[m]} ours"]
            lines = []
            for row in rows:
                runs = matched[id(row)]
                cells, done = [], []
                for m in info["measures"]:
                    stats, done_m = evaluated(runs, protocol, m, knn)
                    cells += [f"{row.paper[m]:.2f}", fmt(stats)]
                    done = done or done_m
                    records.append(record("paper", table, row.label, row.method, row.argv, protocol.describe(knn),
                                          not differs, m, row.paper[m], stats, done_m))
                if done or not differs:  # the paper's protocol lists every row, another only the rows it has
                    lines.append([row.label, command_cell(row), *cells,
                                  seeds_text(done) if done else "-"])
            report += md_table(header + ["seeds"], lines) + [""]
        if not protocols:
            report += md_table(["row", "command", "paper", "ours"],
                               [[r.label, command_cell(r),
                                 " / ".join(f"{r.paper[m]:.2f}" for m in info["measures"]), "-"] for r in rows])
            report.append("")
        missing = [row for row in rows if not matched[id(row)]]
        if missing:
            report.append("Rows with no finished runs yet: run each, then `python linear_eval.py --checkpoint "
                          f"runs/RUN{info.get('eval_extra', '')}`:\n")
            report += [f"- {row.label}: `{row.command(info['seeds'])}`" for row in missing] + [""]
        waiting = [r for row in rows for r in matched[id(row)] if not r.evals]
        if waiting:
            report.append("Finished, not evaluated yet:\n")
            report += [f"- `python linear_eval.py --checkpoint {r.path}{info.get('eval_extra', '')}`"
                       for r in waiting] + [""]


def group_label(key):
    method, dataset, epochs, setting = key
    if setting and setting[0][0] == NO_SCRIPT:
        text = " ".join(f"{k}={v}" for k, v in setting[1:]) + f" (no {method}.py here to read its preset)"
    else:
        text = flags(method, setting)
    return f"{method}.py --dataset {dataset} --epochs {epochs}" + (f" {text}" if text else "")


def command_cell(row):
    return f"`{row.method}.py{' ' + row.argv if row.argv else ''}`"


def monitor(runs):
    """The k-NN monitor's last value (metrics.jsonl) with its protocol: mean ± std over the runs."""
    values = [r.metrics[-1]["knn_top1"] for r in runs if r.metrics and "knn_top1" in r.metrics[-1]]
    if not values:
        return "-"
    a = runs[0].args
    return f"{fmt(mean_std(values))} ({a.get('eval_split')}, k = {a.get('knn_k')}, T = {a.get('knn_t')})"


def other_runs(groups, report, records):
    """Finished runs that match no row of the paper."""
    known = {row.key for row in paper_rows()}
    others = {k: v for k, v in groups.items() if k not in known}
    if not others:
        return
    report.append("## Other runs (no row of the paper has these settings)\n")
    lines = []
    for key in sorted(others, key=str):
        runs = others[key]
        protocols = sorted({p for r in runs for p in r.evals}, key=Protocol.describe) or [None]
        for protocol in protocols:
            cells = []
            for m in ("top1", "top5", "knn_top1"):
                stats, done = evaluated(runs, protocol, m) if protocol else (None, [])
                cells.append(fmt(stats))
                if protocol:
                    records.append(record("other", "", group_label(key), key[0], group_label(key),
                                          protocol.describe(), "", m, "", stats, done))
            evaluated_runs = [r for r in runs if result_of(r, protocol, True)] if protocol else runs
            lines.append([f"`{group_label(key)}`", protocol.describe() if protocol else "not evaluated", *cells,
                          monitor(runs), seeds_text(evaluated_runs)])
    report += md_table(["settings", "evaluation", "top-1", "top-5", "k-NN", "k-NN monitor at the end", "seeds"],
                       lines) + [""]


def unfinished(runs, report):
    if runs:
        report.append("## Unfinished runs (in no table or figure; continue with `--resume runs/RUN`)\n")
        report += md_table(["run", "settings", "epochs done"],
                           [[str(r.path), f"`{group_label(r.key)}`", f"{r.last_epoch} / {r.args['epochs']}"]
                            for r in runs]) + [""]


# ----------------------------------------------------------------------------------------------------------------
# The uniformity family side by side, one recipe at a time
# ----------------------------------------------------------------------------------------------------------------
# A recipe is what every method of a comparison shares: the data, the encoder, the schedule's length and batch, and
# the monitor that measures the runs during training (the k-NN and the analysis behind eval_uniformity,
# eval_alignment, ...). All are flags of every training script (common.py's shared parser). Anything else is a
# method's own setting: a row. A linear probe's protocol is a row's too, so that two protocols are never averaged.
RECIPE = ("dataset", "subset", "arch", "stem", "batchnorm", "image_size", "epochs", "batch_size", "eval_split",
          "knn_k", "knn_t", "analysis_samples")
FAMILY_METHODS = ("byol", "byol_uniformity", "byol_mhe", "simclr", "sfrik", "msbreg")  # a colour each, in this order
# (name, column header, decimals): the family table's measures. knn_monitor: the k-NN monitor's last top-1 (metrics
# .jsonl); eval_*: the analysis of the run's last evaluation; images_per_s: the mean over the run's epochs.
FAMILY_MEASURES = (("top1", "top-1", 2), ("top5", "top-5", 2), ("knn_monitor", "k-NN monitor", 2),
                   ("eval_uniformity", "G2 (Eq. 2)", 3), ("eval_mmd_legendre", "MMD Legendre", 3),
                   ("eval_alignment", "alignment (Eq. A.1)", 3), ("eval_mhe_projector", "MHE projector", 3),
                   ("images_per_s", "images/s", 0))


def recipe_of(args):
    """((name, value), ...) of RECIPE, --stem auto read as the stem it gives."""
    values = {**args, "batchnorm": args.get("batchnorm", True), "stem": stem_of(args)}
    return tuple((name, norm(values.get(name))) for name in RECIPE)


def recipe_flags(recipe):
    """The recipe as flags of any training script, e.g. '--dataset cifar10 --arch resnet18 ... --batch-size 1024'."""
    out = []
    for name, value in recipe:
        if name == "batchnorm":
            out += [] if value else ["--no-batchnorm"]
        elif value is not None:  # --subset not given; an old run without --analysis-samples
            out.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(out)


def recipe_title(recipe):
    r = dict(recipe)
    subset = f" (first {r['subset']} images)" if r["subset"] else ""
    return (f"{r['dataset']}{subset}, {r['arch']} ({r['stem']} stem), "
            f"{'BatchNorm' if r['batchnorm'] else 'no BatchNorm'}, {r['image_size']} px, {r['epochs']} "
            f"epoch{'s' * (r['epochs'] != 1)}, "
            f"batch {r['batch_size']}; monitor on the {r['eval_split']} split (k-NN k = {r['knn_k']}, T = "
            f"{r['knn_t']}; analysis of {known(r['analysis_samples'])} images)")


def probe_flags(probe):
    """linear_eval.py's flags for a probe protocol (those it records)."""
    parts = [f"--dataset {probe.dataset}" if probe.dataset else "", f"--eval-split {probe.eval_split}",
             f"--epochs {probe.epochs}" if probe.epochs is not None else "",
             f"--batch-size {probe.batch_size}" if probe.batch_size is not None else "",
             f"--lr {probe.lr}" if probe.lr is not None else "", "--precompute" if probe.precompute else ""]
    return " ".join(p for p in parts if p)


def row_setting(run):
    """The run's settings beside its method's preset, less the recipe's (a recipe flag is the same on every row)."""
    return tuple((name, value) for name, value in run.key[3] if name not in RECIPE)


def row_label(method, setting):
    text = flags(method, setting)
    return f"{NAMES.get(method, method)}{' ' + text if text else ''}"


def last_evaluation(run):
    """The metrics row of the run's last evaluation (the k-NN monitor and the analysis), or {}."""
    return next((row for row in reversed(run.metrics) if "knn_top1" in row), {})


def family_value(run, probe, measure):
    if measure in ("top1", "top5"):
        return (result_of(run, probe, False) or {}).get(measure) if probe else None
    if measure == "images_per_s":
        values = [row["images_per_s"] for row in run.metrics if "images_per_s" in row]
        return sum(values) / len(values) if values else None
    return last_evaluation(run).get("knn_top1" if measure == "knn_monitor" else measure)


def family_recipes(groups):
    """[(recipe, its finished runs)] of every recipe with runs of two methods or more (a comparison), and
    [(recipe, method, runs)] of the recipes with one method only. Runs whose method's script is not here have no
    preset to tell their settings from the recipe's: left out."""
    by_recipe = {}
    for key in groups:
        if not (key[3] and key[3][0][0] == NO_SCRIPT):
            for run in groups[key]:
                by_recipe.setdefault(recipe_of(run.args), []).append(run)
    shown, alone = [], []
    for recipe in sorted(by_recipe, key=str):
        runs = by_recipe[recipe]
        methods = sorted({r.method for r in runs})
        if len(methods) > 1:
            shown.append((recipe, runs))
        else:
            alone.append((recipe, methods[0], runs))
    return shown, alone


def probe_order(probes):
    """The paper's probe first (Appendix D), then the others by their description."""
    return sorted(probes, key=lambda p: (bool(p.differences("Table 5")), p.describe(knn=False)))


def family_rows(runs):
    """{(method, setting, probe): runs}: a run evaluated with two probe protocols is in two rows (never averaged
    with itself), one never evaluated is in a row with probe None."""
    rows = {}
    for run in runs:
        probes = list(dict.fromkeys(project(p, False) for p in run.evals)) or [None]
        for probe in probes:
            rows.setdefault((run.method, row_setting(run), probe), []).append(run)
    return rows


def paper_numbers(runs):
    """The paper's top-1 for these runs' settings, e.g. '90.74 (Tables 4, 5, C.7, C.8)', or '-'."""
    keys = {r.key for r in runs}
    numbers = {}
    for row in paper_rows():
        if row.key in keys:
            tables = numbers.setdefault(row.paper["top1"], [])
            if row.table not in tables:
                tables.append(row.table)
    return "; ".join(f"{n:.2f} ({'Tables' if len(t) > 1 else 'Table'} "
                     f"{', '.join(x.removeprefix('Table ') for x in t)})" for n, t in numbers.items()) or "-"


def family_stats(rows):
    """[(method, setting, probe, runs, {measure: (mean ± std or None, the runs that have it)})], sorted by linear
    top-1, then (no probe) by the k-NN monitor."""
    lines = []
    for (method, setting, probe), runs in rows.items():
        stats = {}
        for measure, _, _ in FAMILY_MEASURES:
            done = [(r, v) for r in runs if (v := family_value(r, probe, measure)) is not None]
            stats[measure] = (mean_std([v for _, v in done]) if done else None, [r for r, _ in done])
        lines.append((method, setting, probe, runs, stats))

    def order(line):
        top1, knn = line[4]["top1"][0], line[4]["knn_monitor"][0]
        return (0, -top1[0]) if top1 else (1, -knn[0]) if knn else (2, 0)
    return sorted(lines, key=order)


def family_table(i, recipe, runs, report, records):
    """Recipe i: its flags, its probes (lettered, the paper's first) and one row per method, setting and probe."""
    rows = family_rows(runs)
    probes = probe_order({probe for _, _, probe in rows if probe is not None})
    letters = {probe: chr(ord("A") + j) for j, probe in enumerate(probes)}
    train = recipe_flags(recipe)
    report.append(f"### Recipe {i}: {recipe_title(recipe)}\n")
    report.append(f"Train each row with `python <method>.py {train} <settings> --seed S`, then evaluate with "
                  f"`python linear_eval.py --checkpoint runs/RUN <probe flags>`. Probes:\n")
    for probe in probes:
        differs = probe.differences("Table 5")
        report.append(f"- {letters[probe]}: {probe.describe(knn=False)}: `{probe_flags(probe)}`; "
                      + (f"not the paper's ({'; '.join(differs)})" if differs else "the paper's (Appendix D)"))
    report.append("")
    cells = []
    for method, setting, probe, row_runs, stats in family_stats(rows):
        paper, text = paper_numbers(row_runs), flags(method, setting)
        commands = (f"python {method}.py {train}{' ' + text if text else ''} --seed S"
                    + (f"; python linear_eval.py --checkpoint runs/RUN {probe_flags(probe)}" if probe else ""))
        cell = [NAMES.get(method, method), f"`{text}`" if text else "preset", letters.get(probe, "-")]
        for measure, _, digits in FAMILY_MEASURES:
            value, done = stats[measure]
            cell.append(fmt(value, digits) + (f" (n = {len(done)})" if value and len(done) < len(row_runs) else ""))
            records.append({**record("family", train, row_label(method, setting), method, text,
                                     probe.describe(knn=False) if probe else "no linear probe",
                                     not probe.differences("Table 5") if probe else "", measure,
                                     paper if measure == "top1" and paper != "-" else "", value, done),
                            "commands": commands})
        cells.append(cell + [paper, seeds_text(row_runs)])
    report += md_table(["method", "settings", "probe", *(h for _, h, _ in FAMILY_MEASURES), "paper top-1", "seeds"],
                       cells) + [""]


def family_tables(groups, report, records):
    """Per recipe with two methods or more: one row per method, setting and probe protocol, seeds averaged."""
    shown, alone = family_recipes(groups)
    if not shown:
        return
    report.append("## The uniformity family, one recipe at a time\n")
    report.append("Every method trained on the same data, encoder, epochs and batch, and measured by the same "
                  "monitor: the k-NN monitor's last top-1 and the analysis of the last evaluation (Section 5): G2 "
                  "(Eq. 2, t = 2) and SFRIK's Legendre MMD to the uniform law of the encoder features (lower: more "
                  "uniform), alignment (Eq. A.1) of two views' features (lower: better aligned), the projector's "
                  "MHE (Eq. 7). One row per method and setting beside its preset (seeds averaged: mean ± sample "
                  "std) and per linear probe protocol (never averaged across); a measure over fewer runs than the "
                  "row's says n. Sorted by linear top-1, then the rows without a probe by the k-NN monitor.\n")
    for i, (recipe, runs) in enumerate(shown, 1):
        family_table(i, recipe, runs, report, records)
    if alone:
        report.append("Not a comparison (runs of one method only): "
                      + "; ".join(f"{recipe_title(recipe)}: {method}, {len(runs)} run(s)"
                                  for recipe, method, runs in alone) + ".\n")


# ----------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, imported here only)
# ----------------------------------------------------------------------------------------------------------------
FIGURE_METHODS = ("byol", "byol_uniformity", "byol_mhe")  # the paper's curves (Figs. 4-6, 8)


def natural(text):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def preset_groups(groups, methods):
    """Per dataset, the groups of `methods` at their preset (any --epochs, either --eval-split): the paper's curves."""
    out = {}
    for key in sorted(groups, key=lambda k: (methods.index(k[0]) if k[0] in methods else 99, str(k))):
        method, dataset, _, setting = key
        if method in methods and all(name == "eval_split" for name, _ in setting):
            out.setdefault(dataset, []).append(key)
    return out


def curve_label(key, runs):
    method, _, epochs, setting = key
    split = dict(setting).get("eval_split", "test")
    return f"{NAMES.get(method, method)}, {epochs} ep., {split} ({len(runs)} seed{'s' * (len(runs) > 1)})"


def draw_curves(plt, panels, groups, keys, xkey, xlabel, title, path, legend=True):
    """One panel per (metric key, panel title, y label); one line per run, one colour per settings group.
    Returns the path, or None when no run logged any of the metrics."""
    panels = [p for p in panels if any(p[0] in row for key in keys for r in groups[key] for row in r.metrics)]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 7), 3.3 * rows + (cols == 1)), squeeze=False)
    styles, seen = {}, {}
    for key in keys:  # a colour per method (as in Fig. 8), a line style per further group of the same method
        colour = f"C{FIGURE_METHODS.index(key[0])}" if key[0] in FIGURE_METHODS else "C0"
        styles[key] = (colour, ("-", "--", ":", "-.")[seen.get(colour, 0) % 4])
        seen[colour] = seen.get(colour, 0) + 1
    for ax, (metric, panel, ylabel) in zip(axes.flat, panels):
        for key in keys:
            for j, run in enumerate(groups[key]):
                pts = [(row[xkey], row[metric]) for row in run.metrics if metric in row and xkey in row]
                if pts:
                    ax.plot(*zip(*pts), color=styles[key][0], ls=styles[key][1], lw=1.3,
                            marker="." if len(pts) < 30 else None,
                            label=curve_label(key, groups[key]) if j == 0 else None)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(title)
    fig.tight_layout()
    if legend:  # below the panels; savefig's tight box makes room for it
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3 if cols > 1 else 1,
                   frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def figure_8(plt, groups, out, written, notes):
    """Fig. 8: top-1 (ours and the paper's) at micro-batch 1024/N minus the 1024 row, per method, per protocol."""
    rows = [r for r in paper_rows() if r.table == "Table C.8" and r.key is not None]
    protocols = paper_order(protocols_of([run for r in rows for run in groups.get(r.key, [])], False), "Table C.8")
    for n, protocol in enumerate(protocols, 1):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        drawn = False
        for i, method in enumerate(FIGURE_METHODS):
            points = {}
            for row in (r for r in rows if r.method == method):
                micro = 1024 // dict(row.key[3]).get("accum_steps", 1)
                stats, _ = evaluated(groups.get(row.key, []), protocol, "top1", knn=False)
                points[micro] = (row.paper["top1"], stats)
            xs = sorted(points, reverse=True)
            ax.plot(range(len(xs)), [points[x][0] - points[1024][0] for x in xs], color=f"C{i}", ls="--",
                    marker="o", mfc="none", label=f"{NAMES[method]} (paper)")
            if points[1024][1] is None:
                continue
            ours = [(k, x, points[x][1]) for k, x in enumerate(xs) if points[x][1] is not None]
            ax.errorbar([k for k, _, _ in ours], [s[0] - points[1024][1][0] for _, _, s in ours],
                        yerr=[s[1] or 0 for _, _, s in ours], color=f"C{i}", marker="o", capsize=3,
                        label=f"{NAMES[method]} (ours)")
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xticks(range(4), ["1024", "512", "256", "128"])
        ax.set_xlabel("batch size (micro-batches of 1024 / N, gradients averaged)")
        ax.set_ylabel("top-1 change from batch 1024 (%)")
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        differs = protocol.differences("Table C.8")
        ax.set_title("Fig. 8: CIFAR-10 linear top-1 vs batch size\n"
                     + ("paper's protocol" if not differs else "not the paper's protocol: " + "; ".join(differs)),
                     fontsize=9)
        fig.tight_layout()
        path = out / ("fig8.png" if n == 1 else f"fig8-{n}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append((path, f"Fig. 8 ({protocol.describe(knn=False)}); error bars: std over seeds"))
    if not any(p.name.startswith("fig8") for p, _ in written):
        notes.append("Fig. 8: no evaluated run with Table C.8's settings (needs the 1024 row of a method)")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def family_styles(runs):
    """{(method, setting): (colour, marker, line style)}: a colour per method (FAMILY_METHODS' order), a marker and
    a line style per further setting of the same method."""
    styles, seen = {}, {}
    for run in sorted(runs, key=lambda r: (r.method, str(row_setting(r)))):
        key = (run.method, row_setting(run))
        if key not in styles:
            i = FAMILY_METHODS.index(run.method) if run.method in FAMILY_METHODS else len(FAMILY_METHODS)
            k = seen[run.method] = seen.get(run.method, -1) + 1
            styles[key] = (f"C{i % 10}", MARKERS[k % len(MARKERS)], ("-", "--", ":", "-.")[k % 4])
    return styles


def point_label(run, probes):
    """The run's linear top-1 under the first of `probes` it was evaluated with, else its k-NN monitor's."""
    for probe in probes:
        top1 = (result_of(run, probe, False) or {}).get("top1")
        if top1 is not None:
            return f"{top1:.1f}"
    knn = last_evaluation(run).get("knn_top1")
    return f"k-NN {knn:.1f}" if knn is not None else ""


def plane_figure(plt, title, runs, probes):
    """Wang & Isola's alignment-uniformity plane (their Fig. 2; lower left is better): one point per finished run
    at (eval_uniformity, eval_alignment) of its last evaluation, a colour per method, labelled with its top-1.
    Returns the Figure, or None when no run logged both measures."""
    styles, points = family_styles(runs), {}
    for run in runs:
        row = last_evaluation(run)
        if row.get("eval_uniformity") is not None and row.get("eval_alignment") is not None:
            points.setdefault((run.method, row_setting(run)), []).append(
                (row["eval_uniformity"], row["eval_alignment"], point_label(run, probes)))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for key in sorted(points, key=lambda k: (k[0], str(k[1]))):
        colour, marker, _ = styles[key]
        xs, ys, labels = zip(*points[key])
        ax.scatter(xs, ys, color=colour, marker=marker, s=36, label=row_label(*key))
        for x, y, text in points[key]:
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    ax.set_xlabel("uniformity: eval_uniformity, G2 of the encoder features (Eq. 2, t = 2)")
    ax.set_ylabel("alignment: eval_alignment (Eq. A.1)")
    ax.set_title(f"{title}\nlower left is better (Wang & Isola, 2020)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def family_curves_figure(plt, title, runs):
    """eval_uniformity and the k-NN monitor's top-1 against the epoch, one line per finished run, a colour per
    method: where the methods part ways. Returns the Figure, or None when no run logged either."""
    panels = [("eval_uniformity", "uniformity of the encoder features", "G2 (Eq. 2, t = 2)"),
              ("knn_top1", "k-NN monitor", "k-NN top-1 (%)")]
    if not any(m in row for run in runs for row in run.metrics for m, _, _ in panels):
        return None
    styles, labelled = family_styles(runs), set()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (metric, panel, ylabel) in zip(axes, panels):
        for run in sorted(runs, key=lambda r: (r.method, str(row_setting(r)))):  # the legend in the plane's order
            pts = [(row["epoch"], row[metric]) for row in run.metrics if row.get(metric) is not None]
            if pts:
                key = (run.method, row_setting(run))
                colour, marker, ls = styles[key]
                ax.plot(*zip(*pts), color=colour, ls=ls, marker=marker if len(pts) < 30 else None, ms=3, lw=1.2,
                        label=row_label(*key) if (ax, key) not in labelled else None)
                labelled.add((ax, key))
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, frameon=False, fontsize=8)
    return fig


def family_figures(plt, groups, out, written):
    """Per recipe of the family tables: its alignment-uniformity plane and its curves."""
    for i, (recipe, runs) in enumerate(family_recipes(groups)[0], 1):
        rows = family_rows(runs)
        probes = probe_order({probe for _, _, probe in rows if probe is not None})
        title = f"Recipe {i}: {recipe_title(recipe)}"
        title = title if len(title) < 100 else title.replace("; ", ";\n", 1)
        for fig, name, caption in (
                (plane_figure(plt, title, runs, probes), "plane",
                 "alignment-uniformity plane (Wang & Isola, 2020, Fig. 2: lower left is better), one point per "
                 "finished run, labelled with its linear top-1 (" + (f"probe {', then '.join('ABCDEFGH'[:len(probes)])}"
                                                                     if probes else "no probe") + ") or k-NN"),
                (family_curves_figure(plt, title, runs), "curves", "eval_uniformity and k-NN top-1 against epoch")):
            if fig is not None:
                path = out / f"family{i}_{name}.png"
                fig.savefig(path, dpi=110, bbox_inches="tight")
                plt.close(fig)
                written.append((path, f"Recipe {i}: {caption}"))


def figures(groups, runs, out, notes):
    """Write the figures under `out`; returns [(path, caption)]."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise common.UserError("--out draws figures with matplotlib: pip install matplotlib")
    written = []

    def add(path, caption):
        if path:
            written.append((path, caption))

    for dataset, keys in preset_groups(groups, ("byol", "byol_mhe")).items():  # Fig. 4
        blocks = sorted({k for key in keys for r in groups[key] for row in r.metrics for k in row
                         if k.startswith("eval_energy_")}, key=natural)
        blocks = [b for b in blocks if "." in b] or blocks  # the blocks (layer1.0, ...) where logged
        add(draw_curves(plt, [(b, b[len("eval_energy_"):], "hyperspherical energy") for b in blocks], groups, keys,
                        "step", "iteration", f"Fig. 4: hyperspherical energy of each ResNet block's output, {dataset}",
                        out / f"fig4_{dataset}.png"), f"Fig. 4, {dataset}")
    for dataset, keys in preset_groups(groups, FIGURE_METHODS).items():  # Figs. 5 and 6
        add(draw_curves(plt, [("eval_uniformity", "(a) uniformity of encoder features", "G2 (Eq. 2, t = 2)")]
                        + [(f"eval_mhe_{p}", f"(b) MHE objective, {p}", "Eq. 7 sum") for p in common.SUBNETWORKS],
                        groups, keys, "step", "iteration",
                        f"Fig. 5: (a) uniformity of the encoder features, (b) MHE objective, {dataset}",
                        out / f"fig5_{dataset}.png"), f"Fig. 5, {dataset}")
        knn = {(groups[k][0].args.get("knn_k"), groups[k][0].args.get("knn_t")) for k in keys}
        add(draw_curves(plt, [("knn_top1", "", "k-NN top-1 (%)")], groups, keys, "epoch", "epoch",
                        f"Fig. 6: k-NN accuracy during training, {dataset} "
                        f"({'; '.join(f'k = {k}, T = {t}' for k, t in sorted(knn, key=str))})",
                        out / f"fig6_{dataset}.png"), f"Fig. 6, {dataset}")
    if not any(p.name.startswith(("fig4", "fig5", "fig6")) for p, _ in written):
        notes.append("Figs. 4-6: no finished run of byol/byol_uniformity/byol_mhe at its preset "
                     "(any --epochs and --eval-split)")
    figure_8(plt, groups, out, written, notes)
    family_figures(plt, groups, out, written)

    curves, names = out / "loss_curves", set()
    for run in runs:  # every logged loss term of every run, finished or not
        # the terms are logged every epoch; the k-NN and the analysis measures only at evaluations
        terms = [k for k in (run.metrics[0] if run.metrics else {}) if k not in NOT_LOSS and not k.startswith("eval_")
                 and all(isinstance(row.get(k), (int, float)) for row in run.metrics)]
        if not terms:
            continue
        curves.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", run.name)
        name = next(f"{name}{suffix}" for suffix in ["", *(f"-{i}" for i in range(2, len(runs) + 2))]
                    if f"{name}{suffix}" not in names)  # two paths given may hold runs of the same name
        names.add(name)
        state = "" if run.finished else f" (unfinished: epoch {run.last_epoch} / {run.args['epochs']})"
        add(draw_curves(plt, [(t, t, "mean over the epoch") for t in terms], {run.key: [run]}, [run.key], "step",
                        "iteration", f"{run.name}: {group_label(run.key)}{state}", curves / f"{name}.png",
                        legend=False), f"loss terms of {run.path}")
    return written


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def build_parser():
    p = cli.Parser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="run folders, or folders holding run folders (any depth)")
    p.add_argument("--out", type=Path, default=None, help="also write results.md, results.csv, runs.csv and the "
                   "figures (PNG) into this folder")
    return p


def runs_csv(runs, duplicates):
    apart = {id(run): (of, copy) for run, of, copy in duplicates}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "method", "dataset", "epochs", "seed", "settings", "finished", "epochs_done",
                "eval_file", "protocol", "top1", "top5", "knn_top1", "counted"])
    for r in runs:
        of, copy = apart.get(id(r), (None, None))
        counted = "yes" if of is None else \
            f"no: {'a copy of' if copy else 'same settings and seed as'} {', '.join(str(o.path) for o in of)}"
        base = [r.path, r.method, r.args["dataset"], r.args["epochs"], r.seed, group_label(r.key), r.finished,
                r.last_epoch]
        for p, result in r.evals.items():
            w.writerow(base + [r.eval_files[p], p.describe(), result.get("top1"), result.get("top5"),
                               result.get("knn_top1"), counted])
        if not r.evals:
            w.writerow(base + ["", "", "", "", "", counted])
    return buf.getvalue()


# What a report writes into --out; a folder holding any of these holds an earlier report.
REPORT_FILES = ("results.md", "results.csv", "runs.csv", "loss_curves", "fig*.png", "family*.png")


def report_folder(out):
    """`out`, or, when it holds an earlier report, the first of <out>-2, <out>-3, ... that does not exist: an
    earlier report is never replaced (as linear_eval.py never replaces a result)."""
    if not (out.is_dir() and any(next(out.glob(pattern), None) for pattern in REPORT_FILES)):
        return out
    base, n = out if out.name else out.resolve(), 2
    while (free := base.with_name(f"{base.name}-{n}")).exists():
        n += 1
    return free


def collect(paths, notes):
    """(every run found, the number of folders with args.json, the runs counted, the duplicates set apart,
    {key: the finished runs counted}): what the tables and figures are made of."""
    found, candidates = find_runs(paths, notes)
    runs, duplicates = set_apart_duplicates(found, notes)
    groups = {}
    for r in runs:
        if r.finished:
            groups.setdefault(r.key, []).append(r)
    return found, candidates, runs, duplicates, groups


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise common.UserError(f"--out {args.out} is a file, not a folder")
    notes = []
    found, candidates, runs, duplicates, groups = collect(args.paths, notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not found:
        where = ", ".join(map(str, args.paths))
        raise common.UserError(f"no readable run folders under {where} (each is skipped in a note above)" if candidates
                               else f"no run folders (folders with args.json) under {where}")
    done = [r for r in runs if r.finished]

    report = [f"# Results: {len(done)} finished run(s), {len(runs) - len(done)} unfinished"
              + (f"; {len(duplicates)} duplicate(s) set apart" if duplicates else "") + "\n"]
    records = []
    paper_tables(groups, report, records)
    family_tables(groups, report, records)
    other_runs(groups, report, records)
    unfinished([r for r in runs if not r.finished], report)
    duplicates_section(duplicates, report)
    if not done:
        report.append("No finished runs yet.\n")

    if args.out is not None:
        out = report_folder(args.out)
        if out != args.out:
            print(f"note: --out {args.out} holds an earlier report, kept; this one goes to {out}", file=sys.stderr)
        copies = {id(run) for run, _, copy in duplicates if copy}
        try:
            write_out(out, report, records, groups, [r for r in found if id(r) not in copies], found, duplicates)
        except OSError as e:
            raise common.UserError(f"cannot write into --out {out}: {e.strerror or e}")
    print("\n".join(report))
    return 0


def write_out(out, report, records, groups, runs, found, duplicates):
    """results.md, results.csv, runs.csv (every run found) and the figures (loss curves of `runs`) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    written = figures(groups, runs, out, notes)
    report.append("## Figures\n")
    report += [f"- `{p.relative_to(out)}`: {caption}" for p, caption in written] + [f"- {n}" for n in notes] + [""]
    (out / "results.md").write_text("\n".join(report) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(records)
    (out / "runs.csv").write_text(runs_csv(found, duplicates))


if __name__ == "__main__":
    common.cli(main)
