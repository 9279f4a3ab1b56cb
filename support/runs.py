"""The run folder: checkpoints written atomically and read with weights_only=True, args.json, metrics.jsonl rows
that survive a resume, the stop on a signal, and the one-line messages of a full disk. Hand-written around plain
torch.save (as nanoGPT's and DINO's checkpoints) because a pre-empted or failed run must never lose what it had."""
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from support import distributed
from support.errors import Interrupted, UserError, out_of_memory

CHECKPOINT_FORMAT = "hyperreg-1"
CHECKSUM = "checksum"  # the key added to a checkpoint for its checksum (format unchanged: older readers ignore it)


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
    verify(ckpt, path)
    return ckpt


def checksum(ckpt):
    """SHA-256 of everything a checkpoint holds but its checksum, walked in the order torch.save keeps: each
    tensor's dtype, shape and bytes, every other value's type and repr (a float's repr is exact). torch.load does
    not check the zip's CRCs, so without it a flipped byte would be resumed or evaluated silently."""
    digest = hashlib.sha256()

    def walk(value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
        elif isinstance(value, dict):
            digest.update(b"{")
            for k, v in value.items():
                walk(k)
                walk(v)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for v in value:
                walk(v)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())
    walk({k: v for k, v in ckpt.items() if k != CHECKSUM})
    return digest.hexdigest()


UNCHECKED = set()  # checkpoints without a checksum already reported by this process


def verify(ckpt, path):
    """A checkpoint whose checksum does not match its contents is refused; one written before checksums were
    saved is read without the check, and said so once."""
    if CHECKSUM not in ckpt:
        if str(path) not in UNCHECKED and os.environ.get("RANK", "0") == "0":  # once, and once under torchrun
            print(f"note: {path} was written before checkpoints carried a checksum: read without the integrity "
                  f"check", file=sys.stderr)
        UNCHECKED.add(str(path))
    elif ckpt[CHECKSUM] != checksum(ckpt):
        raise UserError(f"{path} is damaged: its contents do not match the checksum saved with it (a byte changed "
                        f"since it was written); resume or evaluate an intact copy")


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
def writing(path, size=0, tmp=None):
    """Turn a failed write of `path` (a full disk, a quota, a read-only file system) into a UserError that names
    its folder and, when the disk is full, the space needed (`size` bytes: the file being written). The temporary
    file `tmp` the write went to is removed first, so the free space given is that of the disk left behind."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save reports a write that failed part-way as RuntimeError
        os_error = e if isinstance(e, OSError) else e.__context__  # torch.save's RuntimeError wraps the OSError
        if not isinstance(os_error, OSError):
            raise  # not a failed write
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
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
        with writing(path, tensor_bytes(obj), tmp):
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
    """A small text file (args.json, metrics.jsonl) replaced atomically: a temporary file, then a rename. A write
    that fails removes the temporary file, keeps the previous file and raises UserError."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path, len(text.encode()), tmp):
            tmp.write_text(text)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def check_writable(path, what):
    """UserError unless `path` (a file or folder, existing or not) can be written, checked before any work: its
    nearest existing folder must be a folder and writable (os.access also sees a read-only file system)."""
    path, existing = Path(path), nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable ({existing} is read-only for us)")


def check_run_folder(args, method):
    """The run folder, checked before any work and not yet created: a new or empty folder we can write to, one
    holding only a failed start of this same command (failed_start: reused), or the folder of the run being resumed.
    A folder holding anything else is never written into."""
    if args.out_dir is None:
        args.out_dir = distributed.from_rank0(str(Path("runs") / f"{method}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {out} is a file, not a folder")
    if not args.resume and out.is_dir() and any(out.iterdir()):
        if (out / "last.pt").exists():
            raise UserError(f"{out} already holds a run (last.pt); resume it with --resume {out} "
                            f"or choose another --out-dir")
        names = sorted(p.name for p in out.iterdir())
        if not failed_start(out, args):
            raise UserError(f"{out} is not empty ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}); a new "
                            f"run needs a new or empty --out-dir")
        if distributed.is_main():
            print(f"# {out} holds only a start of this command that failed before its first checkpoint "
                  f"({', '.join(names)}): reused")
    check_writable(out, "the run folder")
    return out


RUN_FILES = ("args.json", "metrics.jsonl", "last.pt", "encoder.pt")
TEMPORARY = tuple(name + ".tmp" for name in RUN_FILES)  # save_atomic's and write_text_atomic's
RESUME_MAY_CHANGE = ("device", "workers", "data_dir", "sync_bn")  # where and how fast, never what is trained
SAME_RUN_MAY_DIFFER = ("out_dir", *RESUME_MAY_CHANGE)  # a failed start of the same settings


def metrics_rows(path):
    """The complete rows of a metrics.jsonl (a line torn by a kill or a full disk is none)."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            if isinstance(row := json.loads(line), dict):
                rows.append(row)
    return rows


def failed_start(out, args):
    """Whether `out` holds nothing but what a start of these same settings leaves when it fails before its first
    checkpoint (a full disk, out of memory, a non-finite loss, a kill): no last.pt; only our temporary files, a
    metrics.jsonl without a complete row and an args.json of these settings (up to SAME_RUN_MAY_DIFFER). A row, a
    checkpoint, another run's settings, a folder or any other file is data: the folder is then never written into."""
    try:
        for p in out.iterdir():
            if not p.is_file() or p.is_symlink():
                return False
            if not (p.name in TEMPORARY or (p.name == "metrics.jsonl" and not metrics_rows(p))
                    or (p.name == "args.json" and same_settings(p, args))):
                return False
    except OSError:  # unreadable: not ours to judge
        return False
    return True


def same_settings(path, args):
    """Whether the args.json at `path` holds the settings `args` (JSON's reading of them), up to SAME_RUN_MAY_DIFFER."""
    try:
        saved = json.loads(path.read_text())
    except ValueError:  # not JSON, or not text
        return False
    ours = json.loads(json.dumps(vars(args)))
    settings = lambda d: {k: v for k, v in d.items() if k not in SAME_RUN_MAY_DIFFER}  # noqa: E731
    return isinstance(saved, dict) and settings(saved) == settings(ours)


def clear_failed_start(out):
    """Remove what a failed start left in `out` (checked by check_run_folder): its temporary files and a
    metrics.jsonl without a row (its torn line would run into the new run's first row); args.json is rewritten."""
    for name in TEMPORARY:
        (out / name).unlink(missing_ok=True)
    if (out / "metrics.jsonl").is_file() and not metrics_rows(out / "metrics.jsonl"):
        (out / "metrics.jsonl").unlink()


def trim_metrics(path, epochs_done):
    """On resume, keep only the metrics.jsonl rows of the epochs the checkpoint records as done. A row is written
    before the checkpoint that records its epoch, so a run killed between the two has a row for an epoch it trains
    again (dropped here, written again) and never lacks one; a line torn by a kill is dropped too."""
    if not path.exists():
        return
    keep = [row for row in metrics_rows(path) if row.get("epoch", math.inf) <= epochs_done]
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in keep))  # as append_metrics wrote them


def append_metrics(path, row):
    line = json.dumps(row) + "\n"
    with writing(path, len(line)), open(path, "a") as f:
        f.write(line)


def print_run(args, objective):
    """Print every argument and the objective as a formula: the run folder describes itself."""
    print(f"# {args.method} | objective: {objective}")
    for k, v in sorted(vars(args).items()):
        print(f"#   {k:>14} = {v}")


class StopSignal:
    """SIGTERM (cluster pre-emption) and Ctrl-C set a flag; the loop finishes its step, saves and exits. That can
    take minutes (the step, and at an epoch's end the k-NN and the analysis): a second signal stops at once, raising
    Interrupted wherever the run is (exit 128 + signal). The checkpoint on disk stays intact: a write in progress
    goes to a temporary file that save_atomic removes, so the previous last.pt is kept. `on_disk` says which."""

    def __init__(self, on_disk):
        self.signum, self.on_disk = None, on_disk  # on_disk(): what is on disk, in words (Run.on_disk)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        else:
            raise Interrupted(signum, f"stopped at once by a second signal ({signum})")

    def __exit__(self, exc_type, exc, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if isinstance(exc, Interrupted):  # what is on disk once every write in progress has been undone
            raise Interrupted(exc.signum, f"{exc}; {self.on_disk()}") from None


class Run:
    """The state of one training run's folder: what is on disk (`saved`), the stop signal, and the writes in their
    order (a metrics row before the checkpoint that records its epoch; encoder.pt last). Rank 0 alone writes. Not a
    trainer: it owns no loop and calls nothing back."""

    def __init__(self, args, out, device):
        self.args, self.out, self.device = args, out, device
        self.saved = None  # (epoch, step) of the last.pt on disk
        self.stop = StopSignal(self.on_disk)

    def on_disk(self):
        if self.saved is None:
            return f"no checkpoint was written yet ({self.out} holds no last.pt)"
        return (f"the last checkpoint {self.out / 'last.pt'} (step {self.saved[1]}) is intact; continue with "
                f"--resume {self.out}")

    @contextlib.contextmanager
    def saving(self):
        """A write failed: say what is on disk, exit with the signal's status when one was being handled."""
        try:
            yield
        except UserError as e:
            code = 128 + self.stop.signum if self.stop.signum else e.exit_code
            raise UserError(f"{e}; {self.on_disk()}", exit_code=code) from None

    def out_of_memory(self, what, lower):
        return out_of_memory(lambda: f"{what}: lower {lower}; {self.on_disk()}")

    def check_finite(self, loss_sum, where):
        if not math.isfinite(loss_sum):
            raise UserError(f"non-finite loss ({loss_sum}) {where}; stopped without saving: {self.on_disk()}")

    def restore(self, model, optimizer, objective):
        """--resume: the weights, optimizer, step, RNG and the sums of an epoch stopped part-way, as saved; the
        metrics rows of the epochs it records. A new run: print its settings and write args.json.
        Returns (step, epoch, partial_epoch)."""
        args, out = self.args, self.out
        if not args.resume:
            if distributed.is_main():
                print_run(args, objective)
                clear_failed_start(out)  # check_run_folder let only an empty folder or a failed start through
                with self.saving():
                    save_json(vars(args), out / "args.json")
            return 0, 0, {}
        ckpt = load_checkpoint(args.resume)
        load_weights(model, ckpt["model"], args.resume)  # e.g. written before the heads' last Linear lost its bias
        load_weights(optimizer, ckpt["optimizer"], args.resume)
        step, epoch = ckpt["step"], ckpt["epoch"]
        self.saved = (epoch, step)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        if distributed.is_main():
            trim_metrics(out / "metrics.jsonl", epoch)
            if ckpt["args"]["epochs"] != args.epochs:  # --epochs changed the plan: args.json says so
                save_json(vars(args), out / "args.json")
                old = out / "encoder.pt"  # the shorter run's final encoder: kept, but no longer called final
                if old.exists():
                    old.rename(out / f"encoder-epoch{epoch}.pt")
                    print(f"# {old} of the {epoch}-epoch run is now {old.name[:-3]}-epoch{epoch}.pt")
            print(f"# resumed from {args.resume} at epoch {epoch}, step {step}")
        return step, epoch, ckpt.get("partial_epoch", {})  # partial: the running sums of an epoch stopped part-way

    def checkpoint(self, model, optimizer, step, epoch, partial_epoch=None):
        if distributed.is_main():
            state = {"format": CHECKPOINT_FORMAT, "method": self.args.method, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                     "rng": rng_states(self.device), "args": vars(self.args), "argv": sys.argv}
            if partial_epoch:
                state["partial_epoch"] = partial_epoch
            state[CHECKSUM] = checksum(state)  # verified by load_checkpoint
            with self.saving():
                save_atomic(state, self.out / "last.pt")
        self.saved = (epoch, step)

    def end_epoch(self, row, model, optimizer, step, epoch):
        """The epoch's row, then the checkpoint that records it: a kill between the two leaves a row the resume
        writes again, never a gap."""
        if distributed.is_main():
            with self.saving():
                append_metrics(self.out / "metrics.jsonl", row)
        self.checkpoint(model, optimizer, step, epoch)
        if distributed.is_main():
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def stopped(self, signum, step):
        if distributed.is_main():
            print(f"stopped by signal {signum} at step {step}; saved {self.out / 'last.pt'}; continue with "
                  f"--resume {self.out}", file=sys.stderr)
        return 128 + signum

    def finish(self, model):
        if distributed.is_main():
            with self.saving():
                save_atomic(encoder_state(model), self.out / "encoder.pt")
            print(f"done: {self.out / 'last.pt'} (full run), {self.out / 'encoder.pt'} (torchvision ResNet weights)")
        return 0


class EpochSums:
    """The running sums of an epoch's logged terms and its clock, restored when the epoch was stopped part-way, so
    that its row is the uninterrupted run's. mean_loss, partial and row average over the processes: every process
    calls them at the same points."""

    def __init__(self, device, partial):
        self.sums = {k: v.to(device) for k, v in partial.get("sums", {}).items()}
        self.counted, self.t0 = partial.get("steps", 0), time.time() - partial.get("seconds", 0.0)

    def add(self, terms):
        self.counted += 1
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def mean_loss(self):
        """The epoch's mean loss so far; reading it synchronises with the device: only now and then."""
        return distributed.process_mean(self.sums)["loss"].item() / self.counted

    def show(self, bar, loss, lr, extra, batch_size):
        speed = self.counted * batch_size / (time.time() - self.t0)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{speed:.0f}",
                        **{k: f"{v:.5f}" for k, v in extra.items()})

    def partial(self):
        """What a checkpoint in the middle of the epoch keeps of it."""
        sums = distributed.process_mean(self.sums)
        return {"sums": {k: v.detach().cpu() for k, v in sums.items()}, "steps": self.counted,
                "seconds": time.time() - self.t0}

    def row(self, epoch, step, lr, extra, batch_size):
        """The epoch's metrics.jsonl row (epoch counted from 1)."""
        seconds = time.time() - self.t0
        sums = distributed.process_mean(self.sums)
        return {"epoch": epoch + 1, "step": step, **{k: v.item() / self.counted for k, v in sums.items()},
                "lr": lr, **extra, "seconds": round(seconds, 3),
                "images_per_s": round(self.counted * batch_size / seconds, 1)}


def progress_bar(epoch, args, start_step, steps_per_epoch):
    return tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{args.epochs}",
                dynamic_ncols=True, mininterval=1.0, leave=False, disable=not distributed.is_main())
