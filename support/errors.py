"""Bad input and faults as one line, never a traceback: UserError, the `cli(main)` runner, out of memory, and the
hygiene of DataLoader workers. Hand-written because argparse, torch and DataLoader report these as tracebacks, and a
worker that ignores signals would keep a failed script from exiting."""
import contextlib
import datetime
import hashlib
import multiprocessing
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist


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


# Training steps and evaluations say what to lower themselves; outside them, what runs out of memory is building the
# model (in a method's train(), before loop.pretrain) or moving it and the images to the device.
BUILDING = ("building the model or moving it and the images to the device: lower the heads' widths (--hidden-dim, "
            "--proj-dim, --expander) or --arch, or keep the images off the device (--augment per-image)")


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM while the first was being handled: stop at once (exit 128 + signal)."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def cli(main):
    """Run `main()` so that bad input, and running out of memory anywhere, print one line and exit 2 instead of a
    traceback; under torchrun the line is printed once, not by every process (each still exits with its status)."""
    try:
        with out_of_memory(lambda: BUILDING):
            sys.exit(main())
    except UserError as e:
        end_workers()
        report(f"error: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:  # outside the training loop (which saves and exits on its own), or a second signal
        end_workers()
        report(str(e) if isinstance(e, Interrupted) else "interrupted")
        sys.exit(128 + e.signum if isinstance(e, Interrupted) else 130)
    finally:
        if dist.is_initialized():  # torchrun: leave the process group (support/distributed.py joined it)
            dist.destroy_process_group()


def report(line):
    """Print `line` on stderr, once per torchrun job: every process meets the same bad input, and the first to count
    its line prints it. A process that fails alone has a line of its own, and prints it."""
    if first_to_report(line):
        print(line, file=sys.stderr)


def first_to_report(line):
    """Whether no other process of this torchrun job has reported `line`: a counter per line in the key-value store
    that torchrun's agent serves to its processes for the whole job (at MASTER_ADDR:MASTER_PORT, before and after
    they join the process group), one per restart. True outside torchrun, or when the store cannot be reached
    (better twice than never)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("WORLD_SIZE", "1") == "1":
        return True
    key = (f"hyperreg/reported/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/"
           f"{hashlib.sha256(line.encode()).hexdigest()}")
    try:
        address = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        socket.create_connection(address, timeout=5).close()  # else TCPStore retries, logging C++ stack frames
        store = dist.TCPStore(*address, is_master=False, timeout=datetime.timedelta(seconds=10))
        return store.add(key, 1) == 1
    except (RuntimeError, ValueError, KeyError, OSError):  # e.g. torchrun has ended: no store
        return True


def end_workers():
    """Kill this script's DataLoader workers left by an error. They ignore SIGTERM (workers_ignore_signals), and
    the interpreter's exit ends them with SIGTERM and then waits for them: it would wait forever."""
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()


def workers_ignore_signals(worker_id):
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
