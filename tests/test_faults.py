"""Faults during a run (issue 10): metrics rows that survive a resume, a full disk, out of memory, a non-finite loss
before the first checkpoint, and extending a finished run. Tiny BYOL runs of a TinyEncoder through the Python API."""
import errno
import io
import json
import os
import signal

import pytest
import torch

import byol
import common
import loop
from support import runs
from test_training import signal_at, tiny_args, tiny_byol

TIMES = ("seconds", "images_per_s", "eval_seconds")  # the only columns that may differ between two runs


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES} for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def full_run(cifar_dir, tmp_path_factory):
    """The uninterrupted two-epoch run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("full") / "run"
    model = tiny_byol()
    with pytest.MonkeyPatch.context() as m:
        import torchvision.datasets.cifar
        m.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
        assert byol.train(tiny_args(cifar_dir, out), model) == 0
    return out, model.state_dict()


def resume(out):
    model = tiny_byol(seed=123)  # a different init: everything must come from the checkpoint
    assert byol.train(byol.parse_args(["--resume", str(out), "--workers", "0"]), model) == 0
    return model.state_dict()


def assert_same(state, other):
    for name, value in state.items():
        assert torch.equal(value, other[name]), name


class Killed(BaseException):
    """kill -9 at a chosen moment: nothing in the run gets to handle it."""


# --- metrics.jsonl across a resume --------------------------------------------------------------------------------
def test_row_of_an_epoch_stopped_part_way_is_the_uninterrupted_row(cifar_dir, tmp_path, no_md5, full_run):
    out = tmp_path / "run"
    assert byol.train(tiny_args(cifar_dir, out), tiny_byol(), extra_terms=signal_at(8)) == 128 + signal.SIGTERM
    assert runs.load_checkpoint(out / "last.pt")["partial_epoch"]["steps"] == 3  # steps 6-8 of epoch 2
    assert_same(resume(out), full_run[1])
    assert rows(out) == rows(full_run[0])  # the epoch-2 loss averages all its 5 steps, not the 2 after the resume


def test_kill_between_the_row_and_its_checkpoint_loses_and_duplicates_nothing(cifar_dir, tmp_path, no_md5,
                                                                             monkeypatch, full_run):
    out, real_save, calls = tmp_path / "run", runs.save_atomic, []

    def killed_at_second_checkpoint(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the end of epoch 2: its row is written, the checkpoint recording it is not
            raise Killed
        return real_save(obj, path)
    monkeypatch.setattr(runs, "save_atomic", killed_at_second_checkpoint)
    with pytest.raises(Killed):
        byol.train(tiny_args(cifar_dir, out), tiny_byol())
    monkeypatch.setattr(runs, "save_atomic", real_save)
    assert [r["epoch"] for r in rows(out)] == [1, 2] and runs.load_checkpoint(out / "last.pt")["epoch"] == 1
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "st')  # and a line torn by the kill
    assert_same(resume(out), full_run[1])
    assert rows(out) == rows(full_run[0])


# --- a full disk --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_at,status", [(None, 1), (7, 128 + signal.SIGTERM)])
def test_full_disk_keeps_the_last_checkpoint(cifar_dir, tmp_path, no_md5, monkeypatch, full_run, stop_at, status):
    out, opened = tmp_path / "run", []

    class FillsUp(io.FileIO):  # the disk is full after 1000 bytes
        budget = 1000

        def write(self, data):
            FillsUp.budget -= len(data)
            if FillsUp.budget < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def open_(path, mode="r", *args, **kwargs):  # the second checkpoint goes to a full disk
        if mode == "wb" and str(path).endswith("last.pt.tmp"):
            opened.append(path)
            if len(opened) == 2:
                return FillsUp(path, mode)
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(runs, "open", open_, raising=False)
    extra = signal_at(stop_at) if stop_at else None
    with pytest.raises(common.UserError) as e:  # torch.save fails part-way, as on a real full disk
        byol.train(tiny_args(cifar_dir, out), tiny_byol(), extra_terms=extra)
    monkeypatch.delattr(runs, "open")
    message = str(e.value)
    assert e.value.exit_code == status and "\n" not in message
    assert message.startswith(f"no space left in {out}: last.pt needs about ") and "MB free" in message
    assert f"the last checkpoint {out / 'last.pt'} (step 5) is intact" in message
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "last.pt", "metrics.jsonl"]  # no last.pt.tmp
    assert runs.load_checkpoint(out / "last.pt")["epoch"] == 1
    assert_same(resume(out), full_run[1])  # space freed: the resume continues exactly
    assert rows(out) == rows(full_run[0])


# --- out of memory --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where,error,text", [
    ("train_step", torch.OutOfMemoryError("CUDA out of memory"), "out of memory while training: lower --batch-size"),
    ("knn_accuracy", RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                                  "you tried to allocate 1000000 bytes"),
     "out of memory in the k-NN evaluation: lower --image-size or --analysis-samples"),
])
def test_out_of_memory_names_the_setting_and_keeps_the_checkpoint(cifar_dir, tmp_path, no_md5, monkeypatch, where,
                                                                  error, text):
    module = loop if where == "train_step" else common
    real, calls = getattr(module, where), []

    def fails_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) > (5 if where == "train_step" else 1):
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(module, where, fails_in_epoch_2)
    out = tmp_path / "run"
    with pytest.raises(common.UserError) as e:
        byol.train(tiny_args(cifar_dir, out, "--knn-every", "1"), tiny_byol())
    assert str(e.value).startswith(text) and "\n" not in str(e.value)
    assert f"the last checkpoint {out / 'last.pt'} (step 5) is intact" in str(e.value)
    assert runs.load_checkpoint(out / "last.pt")["epoch"] == 1


# --- non-finite loss: say what is on disk ---------------------------------------------------------------------------
def test_non_finite_loss_before_any_checkpoint_says_so(cifar_dir, tmp_path, no_md5):
    out = tmp_path / "run"
    with pytest.raises(common.UserError, match=r"non-finite loss .* no checkpoint was written yet"):
        byol.train(tiny_args(cifar_dir, out, "--log-every", "1"), tiny_byol(),
                   extra_terms=lambda model, o: {"bad": (1.0, torch.tensor(float("nan")))})
    assert not (out / "last.pt").exists()


# --- extending a finished run ---------------------------------------------------------------------------------------
def test_resume_with_more_epochs_extends_a_finished_run(cifar_dir, tmp_path, no_md5, capsys):
    out = tmp_path / "run"
    assert byol.train(tiny_args(cifar_dir, out, "--epochs", "1"), tiny_byol()) == 0
    first = (out / "encoder.pt").read_bytes()
    args = byol.parse_args(["--resume", str(out), "--epochs", "3", "--workers", "0"])
    assert "from step 5 on, the LR cosine and EMA tau schedule are those of a 3-epoch run" in capsys.readouterr().out
    assert byol.train(args, tiny_byol()) == 0
    ckpt = runs.load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 3 and ckpt["args"]["epochs_changed"] == [[5, 1, 3]]
    assert json.loads((out / "args.json").read_text())["epochs"] == 3
    # the 1-epoch run's final encoder is kept under its epoch; encoder.pt is the 3-epoch run's
    assert (out / "encoder-epoch1.pt").read_bytes() == first and (out / "encoder.pt").read_bytes() != first
    r = rows(out)
    assert [x["epoch"] for x in r] == [1, 2, 3]
    warmup, peak = 10 * 5, 1.5 * 10 / 256  # the tiny run: 5 steps per epoch, still in its 10-epoch warm-up
    assert r[1]["lr"] == pytest.approx(common.lr_at(9, 15, warmup, peak))
    assert r[1]["tau"] == pytest.approx(common.ema_tau(9, 15, 0.99))  # the 3-epoch run's schedule from step 5 on
    with pytest.raises(common.UserError, match="has already trained 3 epochs"):
        byol.parse_args(["--resume", str(out), "--epochs", "2"])


# --- a start that failed before its first checkpoint (issue 18, item 6) ---------------------------------------------
def test_full_disk_at_the_start_leaves_no_temporary_file(cifar_dir, tmp_path, no_md5, monkeypatch):
    out, real_write = tmp_path / "run", runs.Path.write_text

    def fills_up(self, text, *args, **kwargs):  # the disk is full: half of args.json is written
        if self.name.endswith(".tmp"):
            real_write(self, text[:len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, text, *args, **kwargs)
    # the disk has 5 kB free once the half-written temporary file is removed, none while it is there
    monkeypatch.setattr(runs, "free_space", lambda folder: 0 if any(folder.glob("*.tmp")) else 5 * 2**10)
    monkeypatch.setattr(runs.Path, "write_text", fills_up)
    with pytest.raises(common.UserError) as e:
        byol.train(tiny_args(cifar_dir, out, "--epochs", "1"), tiny_byol())
    monkeypatch.undo()
    assert e.value.exit_code == 1 and str(e.value).startswith(f"no space left in {out}: args.json needs about ")
    assert "kB, 5.0 kB free; no checkpoint was written yet" in str(e.value)
    assert list(out.iterdir()) == []  # no args.json.tmp: the same command can start again
    assert runs.check_run_folder(tiny_args(cifar_dir, out, "--epochs", "1"), "byol") == out


def test_a_failed_start_is_reused_by_the_same_command_only(cifar_dir, tmp_path, no_md5, capsys, monkeypatch):
    out, flags = tmp_path / "run", ("--epochs", "1", "--analysis-samples", "0")
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with monkeypatch.context() as m, pytest.raises(common.UserError, match="no checkpoint was written yet"):
        m.setattr(loop, "train_step", out_of_memory)
        byol.train(tiny_args(cifar_dir, out, *flags), tiny_byol())  # dies at its first step
    (out / "last.pt.tmp").write_bytes(b"half a checkpoint")  # as a kill -9 during a write leaves
    (out / "metrics.jsonl").write_text('{"epoch": 1, "lo')  # a first row torn by a full disk: no row
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for other, text in (["--seed", "1"], "is not empty"), (["--workers", "1"], None):
        if text:  # another command's failed start (the seed decides what is trained): not ours to reuse
            with pytest.raises(common.UserError, match=text):
                runs.check_run_folder(tiny_args(cifar_dir, out, *flags, *other), "byol")
        else:  # where and how fast may differ, as on --resume
            assert runs.check_run_folder(tiny_args(cifar_dir, out, *flags, *other), "byol") == out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    capsys.readouterr()
    assert byol.train(tiny_args(cifar_dir, out, *flags), tiny_byol()) == 0  # the same command
    assert f"# {out} holds only a start of this command that failed before its first checkpoint " \
           f"(args.json, last.pt.tmp, metrics.jsonl): reused" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "encoder.pt", "last.pt", "metrics.jsonl"]
    assert [r["epoch"] for r in rows(out)] == [1]


@pytest.mark.parametrize("extra", ["notes.txt", "metrics row", "folder", "other tmp"])
def test_a_folder_with_data_is_never_a_failed_start(cifar_dir, tmp_path, extra):
    out = tmp_path / "run"
    out.mkdir()
    args = tiny_args(cifar_dir, out)
    runs.save_json(vars(args), out / "args.json")  # this command's, as its failed start wrote it
    if extra == "notes.txt":
        (out / "notes.txt").write_text("mine")
    elif extra == "metrics row":
        (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 3.3}\n')  # a row: data, though no checkpoint
    elif extra == "folder":
        (out / "figures").mkdir()
    else:
        (out / "notes.tmp").write_text("not one of ours")
    before = {p.name: p.is_dir() or p.read_bytes() for p in out.iterdir()}
    with pytest.raises(common.UserError, match="is not empty"):
        runs.check_run_folder(args, "byol")
    assert {p.name: p.is_dir() or p.read_bytes() for p in out.iterdir()} == before


# --- a second signal stops at once (issue 18, item 13) --------------------------------------------------------------
def twice_at(loss_call, signum):
    """An extra term that sends us `signum` twice during the given micro-batch: the second before the first acted."""
    count = {"n": 0}

    def extra(model, out):
        count["n"] += 1
        if count["n"] == loss_call:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
        return {}
    return extra


def exit_status(capsys, main):
    """(status, last stderr line) of main() run through common.cli, as the scripts run; never a traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        common.cli(main)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exit_.value.code, err.strip().splitlines()[-1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once_and_keeps_the_checkpoint(cifar_dir, tmp_path, no_md5, capsys, full_run,
                                                                signum):
    out = tmp_path / "run"
    status, line = exit_status(capsys, lambda: byol.train(tiny_args(cifar_dir, out), tiny_byol(),
                                                          extra_terms=twice_at(7, signum)))  # in step 7
    assert status == 128 + signum
    assert line.endswith(f"stopped at once by a second signal ({signum}); the last checkpoint {out / 'last.pt'} "
                         f"(step 5) is intact; continue with --resume {out}")  # after the progress bar
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "last.pt", "metrics.jsonl"]
    assert runs.load_checkpoint(out / "last.pt")["step"] == 5
    if signum == signal.SIGINT:
        assert_same(resume(out), full_run[1])
        assert rows(out) == rows(full_run[0])


def test_a_second_signal_during_the_stop_checkpoint_keeps_the_previous_one(cifar_dir, tmp_path, no_md5, capsys,
                                                                          monkeypatch):
    out = tmp_path / "run"

    class SecondCtrlC(io.FileIO):  # Ctrl-C again while the stop checkpoint is half written
        def write(self, data):
            os.kill(os.getpid(), signal.SIGINT)
            return super().write(data)

    def open_(path, mode="r", *args, **kwargs):
        if mode == "wb" and str(path).endswith("last.pt.tmp") and (out / "last.pt").exists():
            return SecondCtrlC(path, mode)
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(runs, "open", open_, raising=False)
    status, line = exit_status(capsys, lambda: byol.train(tiny_args(cifar_dir, out), tiny_byol(),
                                                          extra_terms=signal_at(7)))  # the first: SIGTERM
    monkeypatch.delattr(runs, "open")
    assert status == 130 and line.endswith(f"the last checkpoint {out / 'last.pt'} (step 5) is intact; continue "
                                           f"with --resume {out}")
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "last.pt", "metrics.jsonl"]  # no last.pt.tmp
    assert runs.load_checkpoint(out / "last.pt")["step"] == 5
