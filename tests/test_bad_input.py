"""Bad input (issue 10): every mistake a user can make is one line on stderr with exit status 2, no traceback, and
nothing in a run folder written or lost. Most cases run the scripts' main() in this process through common.cli, the
same path as the command line without a new interpreter per case (2.4 s each); one case runs the script itself."""
import json
import os
import zipfile

import pytest
import torch

import byol
import byol_mhe
import byol_uniformity
import common
import linear_eval
import msbreg
import sfrik
import simclr
from support import runs
from conftest import TinyEncoder, run_script, write_folder

SCRIPTS = {"byol": byol, "byol_mhe": byol_mhe, "byol_uniformity": byol_uniformity, "simclr": simclr,
           "sfrik": sfrik, "msbreg": msbreg, "linear_eval": linear_eval}


def run_main(script, argv, capsys):
    """(exit status, stdout, stderr) of `script.py argv` run through common.cli in this process."""
    with pytest.raises(SystemExit) as exit_:
        common.cli(lambda: SCRIPTS[script].main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def check_refused(result, text, status=2):
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == status and "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: ") and text in lines[-1], err
    return lines


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def tiny_argv(data_dir, out, *extra):
    return ["--data-dir", data_dir, "--batch-size", "10", "--epochs", "1", "--workers", "0", "--hidden-dim", "32",
            "--proj-dim", "8", "--knn-every", "0", "--out-dir", out, *extra]


@pytest.fixture(scope="module")
def tiny_run(cifar_dir, tmp_path_factory):
    """A finished one-epoch BYOL run of a TinyEncoder (its settings say resnet18: its weights do not fit them)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torchvision_cifar(), "check_integrity", lambda *a, **k: True)
        torch.manual_seed(0)
        args = byol.parse_args([str(a) for a in tiny_argv(cifar_dir, out)])
        assert byol.train(args, byol.BYOL(TinyEncoder(16), 16, 32, 8)) == 0
    return out


def torchvision_cifar():
    import torchvision.datasets.cifar
    return torchvision.datasets.cifar


# --- numbers: an argparse type on the flag's own line (support/cli.py) --------------------------------------------
@pytest.mark.parametrize("script,flags,text", [
    ("byol", ["--accum-steps", "16", "--batch-size", "16"], "BatchNorm needs at least 2 images per micro-batch"),
    ("byol", ["--hidden-dim", "0"], "argument --hidden-dim: must be a positive integer, got 0"),
    ("byol", ["--proj-dim", "0"], "argument --proj-dim: must be a positive integer"),
    ("simclr", ["--proj-dim", "0"], "argument --proj-dim: must be a positive integer"),
    ("byol", ["--log-every", "0"], "argument --log-every: must be a positive integer"),
    ("byol", ["--knn-k", "-1"], "argument --knn-k: must be a positive integer"),
    ("byol", ["--warmup-epochs", "nan"], "argument --warmup-epochs: must be a finite number >= 0, got nan"),
    ("byol", ["--base-lr", "-1"], "argument --base-lr: must be a finite number > 0"),
    ("byol", ["--weight-decay", "inf"], "argument --weight-decay: must be a finite number >= 0"),
    ("byol", ["--image-size", "1"], "argument --image-size: must be an integer >= 8"),
    ("byol", ["--knn-t", "0"], "argument --knn-t: must be a finite number > 0"),
    ("byol", ["--knn-every", "-1"], "argument --knn-every: must be an integer >= 0"),
    ("byol", ["--analysis-samples", "-1"], "argument --analysis-samples: must be 0 (off) or an integer >= 2"),
    ("byol", ["--analysis-samples", "1"], "argument --analysis-samples: must be 0 (off) or an integer >= 2"),
    ("byol", ["--tau-base", "5"], "argument --tau-base: must be a number in [0, 1]"),
    ("byol", ["--epochs", "0"], "argument --epochs: must be a positive integer"),
    ("byol", ["--subset", "0"], "argument --subset: must be a positive integer"),
    ("byol", ["--seed", "-1"], "argument --seed: must be an integer >= 0"),
    ("byol", ["--workers", "-2"], "argument --workers: must be an integer >= 0"),
    ("byol_uniformity", ["--unif-t", "-2"], "argument --unif-t: must be a finite number > 0"),
    ("byol_uniformity", ["--unif-weight", "inf"], "argument --unif-weight: must be a finite number"),
    ("byol_mhe", ["--mhe-weight", "nan"], "argument --mhe-weight: must be a finite number"),
    ("simclr", ["--temperature", "-0.5"], "argument --temperature: must be a finite number > 0"),
    ("simclr", ["--jitter-strength", "2"], "argument --jitter-strength: must be between 0 and 1.25"),
    ("sfrik", ["--inv-weight", "nan"], "argument --inv-weight: must be a finite number"),
    ("sfrik", ["--mmd-weight", "inf"], "argument --mmd-weight: must be a finite number"),
    ("linear_eval", ["--workers", "-1"], "argument --workers: must be an integer >= 0"),
    ("linear_eval", ["--lr", "nan"], "argument --lr: must be a finite number > 0"),
    ("linear_eval", ["--momentum", "2"], "argument --momentum: must be a number in [0, 1]"),
    ("linear_eval", ["--knn-t", "-1"], "argument --knn-t: must be a finite number > 0"),
    ("linear_eval", ["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
])
def test_bad_numbers(script, flags, text, tmp_path, capsys):
    place = ["--random-init", "--dataset", "cifar10", "--out", tmp_path / "run" / "r.json"] \
        if script == "linear_eval" else ["--out-dir", tmp_path / "run"]
    check_refused(run_main(script, [*flags, "--data-dir", tmp_path, *place], capsys), text)
    assert not (tmp_path / "run").exists()


def test_unknown_centroid_reading(tmp_path, capsys):
    lines = check_refused(run_main("msbreg", ["--centroid", "leave-two-out", "--data-dir", tmp_path, "--out-dir",
                                              tmp_path / "run"], capsys), "invalid choice: 'leave-two-out'")
    assert len(lines) == 1 and "all-views" in lines[0]   # one line, naming the readings there are
    assert not (tmp_path / "run").exists()


def test_script_prints_one_line_for_a_bad_number(tmp_path):
    proc = run_script("byol.py", "--hidden-dim", "0", "--out-dir", tmp_path / "run")
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "error: argument --hidden-dim: must be a positive integer, got 0 (see --help)"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script,flag,term", [("byol_mhe", "--mhe-weight", "maximises the hyperspherical energy"),
                                              ("byol_uniformity", "--unif-weight", "maximises L_uniformity"),
                                              ("sfrik", "--inv-weight", "pushes the two views of each image apart"),
                                              ("sfrik", "--mmd-weight", "maximises the MMD to the uniform law"),
                                              ("msbreg", "--sv-weight", "shrinks the singular values"),
                                              ("msbreg", "--brownian-weight", "same random walk")])
def test_negative_regulariser_weight_is_warned_about(script, flag, term, tmp_path, capsys):
    # a legitimate experiment: warned, then the run goes on (here it stops at the missing dataset)
    lines = check_refused(run_main(script, [flag, "-10", "--dataset", "folder", "--data-dir", tmp_path / "none",
                                            "--out-dir", tmp_path / "run"], capsys), "expects image folders")
    assert lines[0].startswith("warning:") and term in lines[0] and len(lines) == 2


# --- where results go: checked before any work --------------------------------------------------------------------
def test_out_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    check_refused(run_main("byol", ["--out-dir", tmp_path / "file"], capsys), "is a file, not a folder")
    check_refused(run_main("byol", ["--out-dir", tmp_path / "file" / "run"], capsys), "cannot be created")
    assert (tmp_path / "file").read_text() == "x"


def test_out_dir_on_a_read_only_file_system(tmp_path, capsys, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    check_refused(run_main("byol", ["--out-dir", tmp_path / "run"], capsys), "is not writable")
    check_refused(run_main("linear_eval", ["--random-init", "--dataset", "cifar10", "--out", tmp_path / "r.json"],
                           capsys), "is not writable")
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_folder_is_not_a_new_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    before = files(out)
    check_refused(run_main("byol", ["--out-dir", out], capsys), "is not empty (args.json, metrics.jsonl)")
    assert files(out) == before


def test_linear_eval_out_that_is_a_folder_or_not_creatable(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, text in ((tmp_path, "is a folder"), (tmp_path / "file" / "r.json", "cannot be created")):
        check_refused(run_main("linear_eval", ["--random-init", "--dataset", "cifar10", "--out", out], capsys), text)


# --- --resume keeps the run's settings ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags,named", [
    (["--arch", "resnet50"], "--arch"),
    (["--out-dir", "elsewhere"], "--out-dir"),
    (["--no-batchnorm", "--base-lr", "0.1"], "--base-lr, --no-batchnorm"),
    (["--epochs", "3", "--seed", "1"], "--seed"),
])
def test_resume_refuses_flags_it_would_ignore(tiny_run, flags, named, capsys):
    before = files(tiny_run)
    check_refused(run_main("byol", ["--resume", tiny_run, *flags], capsys), f"{named} cannot be given with --resume")
    assert files(tiny_run) == before


def test_linear_eval_refuses_encoder_flags_with_a_checkpoint(tiny_run, capsys):
    check_refused(run_main("linear_eval", ["--checkpoint", tiny_run, "--arch", "resnet50"], capsys),
                  "--arch cannot be given with --checkpoint")


def test_resume_with_another_script(tiny_run, capsys):
    check_refused(run_main("byol_mhe", ["--resume", tiny_run], capsys), "resume it with byol.py")


# --- inconsistent checkpoints, data that would give wrong labels, unreadable images -------------------------------
def test_checkpoint_whose_weights_do_not_fit_its_settings(tiny_run, capsys, no_md5):
    before = files(tiny_run)
    check_refused(run_main("byol", ["--resume", tiny_run, "--workers", "0"], capsys), "is inconsistent")
    check_refused(run_main("linear_eval", ["--checkpoint", tiny_run, "--workers", "0"], capsys), "is inconsistent")
    assert files(tiny_run) == before


def test_folder_val_classes_must_be_train_classes(tmp_path, capsys):
    data = write_folder(tmp_path / "data", classes=3, n_train=2, n_val=1, size=8)
    (data / "val" / "c2").rename(data / "val" / "c9")
    check_refused(run_main("byol", ["--dataset", "folder", "--data-dir", data, "--out-dir", tmp_path / "run"], capsys),
                  "hold different classes, so their labels would not match: val lacks c2; val adds c9")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def corrupt_folder(tmp_path):
    data = write_folder(tmp_path / "data", classes=2, n_train=4, n_val=1, size=16)
    bad = data / "train" / "c1" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: the header survives, the pixels do not
    return data, bad


FOLDER_RUN = ["--dataset", "folder", "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--workers", "1",
              "--hidden-dim", "16", "--proj-dim", "8"]


def test_corrupt_image_is_named(corrupt_folder, tmp_path):
    data, bad = corrupt_folder
    args = byol.parse_args([*FOLDER_RUN, "--data-dir", str(data), "--out-dir", str(tmp_path / "run")])
    with pytest.raises(common.UserError) as e:   # raised in a DataLoader worker
        byol.train(args, byol.BYOL(TinyEncoder(8), 8, 16, 8))
    assert str(e.value) == f"cannot read image {bad}: image file is truncated"


def test_corrupt_image_stops_the_script_cleanly(corrupt_folder, tmp_path):
    # the worker ignores SIGTERM: without ending it, the script would print its error and never exit
    data, bad = corrupt_folder
    proc = run_script("byol.py", *FOLDER_RUN, "--data-dir", data, "--out-dir", tmp_path / "run", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].split("\r")[-1].endswith(f"error: cannot read image {bad}: "
                                                                         f"image file is truncated")


# --- linear_eval ----------------------------------------------------------------------------------------------------
def test_diverging_probe_writes_no_result(cifar_dir, tmp_path, capsys, no_md5):
    check_refused(run_main("linear_eval", ["--random-init", "--dataset", "cifar10", "--data-dir", cifar_dir,
                                           "--precompute", "--epochs", "1", "--batch-size", "5", "--subset", "20",
                                           "--workers", "0", "--lr", "1e30", "--out", tmp_path / "r.json"], capsys),
                  "the linear probe diverged")
    assert list(tmp_path.iterdir()) == []


def test_second_evaluation_keeps_the_first(cifar_dir, tmp_path, capsys, no_md5):
    argv = ["--random-init", "--dataset", "cifar10", "--data-dir", cifar_dir, "--precompute", "--epochs", "1",
            "--subset", "10", "--workers", "0", "--out", tmp_path / "r.json"]
    (tmp_path / "r.json").write_text("earlier")
    code, out, _ = run_main("linear_eval", argv, capsys)
    assert code == 0 and "r.json holds an earlier result, kept; this one goes to r-2.json" in out
    assert (tmp_path / "r.json").read_text() == "earlier"
    assert json.loads((tmp_path / "r-2.json").read_text())["method"] == "random-init"
    (tmp_path / "r-3.json").write_text("taken")  # the next free name after r-2
    assert run_main("linear_eval", argv, capsys)[0] == 0 and (tmp_path / "r-4.json").exists()


# --- checkpoints checked: a checksum (issue 18, item 3) and saved settings as the command line's (item 7) ---------
def rewritten(tiny_run, folder, change):
    """A copy of tiny_run's last.pt in `folder`, `change(ckpt)` applied and its checksum made to match."""
    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
    change(ckpt)
    ckpt[runs.CHECKSUM] = runs.checksum(ckpt)
    folder.mkdir()
    torch.save(ckpt, folder / "last.pt")
    return folder


def flip_a_weight_byte(src, dst):
    """Copy the checkpoint `src` to `dst` with one bit flipped in the middle of its largest tensor's bytes (a zip
    entry stored uncompressed: the data follows the 30-byte local header, the name and the extra field)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    at = entry.header_offset
    start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(data[at + 28:at + 30], "little")
    data[start + entry.file_size // 2] ^= 0x10
    dst.mkdir()
    (dst / "last.pt").write_bytes(bytes(data))
    return dst


def tensors(obj):
    """Every tensor in a nested dict/list, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for v in values for t in tensors(v)]


def test_a_flipped_byte_in_a_checkpoint_is_refused(tiny_run, tmp_path, capsys, no_md5):
    bad = flip_a_weight_byte(tiny_run / "last.pt", tmp_path / "bad")
    read, good = (torch.load(p / "last.pt", weights_only=True) for p in (bad, tiny_run))  # without a word
    assert sum(not torch.equal(a, b) for a, b in zip(tensors(read), tensors(good))) == 1
    before = files(bad)
    text = f"{bad / 'last.pt'} is damaged: its contents do not match the checksum saved with it"
    check_refused(run_main("byol", ["--resume", bad, "--workers", "0"], capsys), text)
    check_refused(run_main("linear_eval", ["--checkpoint", bad, "--workers", "0"], capsys), text)
    assert files(bad) == before


def test_a_checkpoint_without_a_checksum_is_read_and_said_so_once(tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
    del ckpt[runs.CHECKSUM]  # as written before checkpoints carried one
    (tmp_path / "old").mkdir()
    torch.save(ckpt, tmp_path / "old" / "last.pt")
    args = byol.parse_args(["--resume", str(tmp_path / "old"), "--workers", "0"])
    assert runs.load_checkpoint(tmp_path / "old")["step"] == 5 and args.batch_size == 10  # loaded again: no second note
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: {tmp_path / 'old' / 'last.pt'} was written before checkpoints carried a checksum: read "
                   f"without the integrity check"]


@pytest.mark.parametrize("setting,value,text", [
    ("batch_size", 0, "--batch-size 0 (must be a positive integer, got 0)"),
    ("workers", -5, "--workers -5 (must be an integer >= 0, got -5)"),
    ("batch_size", "10", "--batch-size 10 (saved as str '10')"),
    ("epochs", 1.5, "--epochs 1.5 (invalid literal for int() with base 10: '1.5')"),
    ("batch_size", None, "--batch-size None (invalid literal"),
    ("dataset", "mnist", "--dataset mnist (not one of cifar10, cifar100, stl10, imagenet, folder)"),
    ("batchnorm", "yes", "--no-batchnorm yes (not True or False)"),
    ("hidden_dim", -1, "--hidden-dim -1 (must be a positive integer"),
    ("accum_steps", 3, "holds settings the command line refuses: --batch-size 10 is not divisible by --accum-steps 3"),
    ("args", [1], "holds no settings (its 'args' is a list)"),
])
def test_a_saved_setting_the_command_line_refuses(tiny_run, tmp_path, capsys, setting, value, text):
    def change(ckpt):
        if setting == "args":
            ckpt["args"] = value
        else:
            ckpt["args"][setting] = value
    bad = rewritten(tiny_run, tmp_path / "bad", change)
    before = files(bad)
    lines = check_refused(run_main("byol", ["--resume", bad], capsys), text)
    assert len(lines) == 1 and str(bad / "last.pt") in lines[0]
    assert files(bad) == before


def test_saved_settings_given_again_are_not_held_against_the_run(tiny_run, tmp_path, capsys):
    bad = rewritten(tiny_run, tmp_path / "bad", lambda ckpt: ckpt["args"].update(workers=-5))
    assert byol.parse_args(["--resume", str(bad), "--workers", "0"]).workers == 0  # --workers may change on resume


@pytest.mark.parametrize("change,text", [
    ({"image_size": 0}, "holds a setting the command line refuses: --image-size 0 (must be an integer >= 8 (pixels), "
                        "got 0)"),
    ({"stem": 3}, "holds a setting the command line refuses: --stem 3 (saved as int 3)"),
    ({"arch": None}, "holds no arch setting"),
])
def test_linear_eval_refuses_a_saved_setting_the_command_line_refuses(tiny_run, tmp_path, capsys, change, text):
    def apply(ckpt):  # None: a setting the checkpoint lacks
        ckpt["args"].update(change)
        ckpt["args"] = {k: v for k, v in ckpt["args"].items() if v is not None or k not in change}
    bad = rewritten(tiny_run, tmp_path / "bad", apply)
    check_refused(run_main("linear_eval", ["--checkpoint", bad, "--workers", "0"], capsys), f"{bad / 'last.pt'} {text}")


def test_linear_eval_leaves_the_settings_it_does_not_read_to_resume(tiny_run, tmp_path, capsys):
    odd = rewritten(tiny_run, tmp_path / "odd", lambda ckpt: ckpt["args"].update(log_every=0))
    check_refused(run_main("linear_eval", ["--checkpoint", odd, "--workers", "0"], capsys), "is inconsistent")
    check_refused(run_main("byol", ["--resume", odd], capsys), "--log-every 0 (must be a positive integer, got 0)")


@pytest.mark.parametrize("given", [False, True])
def test_linear_eval_never_creates_the_data_dir_a_checkpoint_names(tiny_run, cifar_dir, tmp_path, capsys, no_md5,
                                                                 monkeypatch, given):
    # the saved data_dir is a path read from a file: used only if it exists, never created nor downloaded into
    gone = tmp_path / "gone" / "data"
    run = rewritten(tiny_run, tmp_path / "run", lambda ckpt: ckpt["args"].update(data_dir=str(gone)))
    monkeypatch.setattr(common, "encoder_from_checkpoint", lambda ckpt, source: (TinyEncoder(16), 16))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(cifar_dir)  # ./data, the default
    flags = ["--data-dir", cifar_dir] if given else []
    code, out, err = run_main("linear_eval", ["--checkpoint", run, *flags, "--precompute", "--epochs", "1", "--subset",
                                              "10", "--workers", "0"], capsys)
    assert code == 0, err
    where = f"from {cifar_dir} (--data-dir)" if given else \
        f"from ./data (the default; the checkpoint's data_dir {gone} does not exist)"
    assert where in out and not (tmp_path / "gone").exists()
