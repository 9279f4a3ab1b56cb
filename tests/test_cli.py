"""End to end as a user runs it: pretrain -> checkpoint -> linear evaluation, and bad input."""
import json

import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import run_script

TINY = ["--epochs", "1", "--workers", "0", "--hidden-dim", "64", "--proj-dim", "32"]


def check_ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_one_line_error(proc, text):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and "\n" not in err, err
    assert text in err, err


@pytest.fixture(scope="module")
def cifar_run(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("byol_cifar")
    proc = check_ok(run_script("byol.py", "--dataset", "cifar10", "--data-dir", cifar_dir, "--batch-size", "16",
                               "--accum-steps", "2", "--out-dir", out, *TINY))
    return out, proc


def test_byol_cifar_pretrain_writes_a_self_describing_run(cifar_run):
    out, proc = cifar_run
    assert "objective: L = L_BYOL (Eq. 3)" in proc.stdout and "base_lr = 1.5" in proc.stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 1
    row = rows[0]
    for key in ("epoch", "step", "loss", "byol", "lr", "tau", "knn_top1", "seconds", "images_per_s"):
        assert key in row
    assert row["step"] == 50 // 16 and 0 <= row["loss"] <= 8 and 0 <= row["knn_top1"] <= 100
    # the paper's uniformity analysis (Figs. 4, 5), logged for plain BYOL too, with the a2 kernel, under eval_ names:
    # the energy of each of ResNet-18's 8 blocks (Fig. 4) by its torchvision module path
    analysis = ["eval_uniformity", "eval_alignment", "eval_mhe_encoder", "eval_mhe_projector", "eval_mhe_predictor"]
    blocks = [f"eval_energy_layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    for key in analysis + blocks:
        assert isinstance(row[key], float) and row[key] == row[key], key
    assert not {"uniformity", "alignment"} & set(row) and not [k for k in row if k.startswith("energy")]
    assert -4 <= row["eval_uniformity"] <= 0 and 0 <= row["eval_alignment"] <= 4
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["format"] == "hyperreg-1" and ckpt["method"] == "byol" and ckpt["epoch"] == 1
    assert ckpt["args"]["arch"] == "resnet18" and ckpt["args"]["accum_steps"] == 2 and "byol.py" in ckpt["argv"][0]
    assert any(k.startswith("target_encoder.") for k in ckpt["model"]) and ckpt["optimizer"]["state"]
    assert json.loads((out / "args.json").read_text())["tau_base"] == 0.99
    # the bare encoder loads into torchvision's ResNet-18 with the CIFAR stem (as the README shows)
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    net.load_state_dict(torch.load(out / "encoder.pt", weights_only=True))


@pytest.mark.parametrize("mode", [[], ["--precompute"], ["--augment", "per-image"]])
def test_linear_eval_on_byol_checkpoint(cifar_run, mode):
    out, _ = cifar_run
    proc = check_ok(run_script("linear_eval.py", "--checkpoint", out / "last.pt", "--epochs", "2", "--workers", "0",
                               *mode))
    written = proc.stdout.strip().splitlines()[-1].split(" -> ")[-1]  # linear_eval_test.json, -2, -3: none replaced
    assert written.startswith(str(out / "linear_eval_test")) and written.endswith(".json")
    res = json.loads(open(written).read())
    assert res["encoder_unchanged"] and res["method"] == "byol" and res["precompute"] == ("--precompute" in mode)
    assert 0 <= res["top1"] <= res["top5"] <= 100 and 0 <= res["knn_top1"] <= 100
    assert f"top1 {res['top1']:.2f}" in proc.stdout
    # Appendix D's ft_learning_rate 0.2 is a base LR: the probe trains at 0.2 x 100 / 256
    assert (res["lr"], res["batch_size"], res["knn_k"], res["knn_t"]) == (0.2, 100, 200, 0.1)
    assert res["effective_lr"] == pytest.approx(0.078125) and "LR 0.2 x 100 / 256 = 0.07812" in proc.stdout
    assert res["checkpoint_epoch"] == 1 and "last.pt (epoch 1 of 1)" in proc.stdout  # which weights were evaluated


def test_linear_eval_random_init_baseline(cifar_dir, tmp_path):
    out = tmp_path / "r.json"
    check_ok(run_script("linear_eval.py", "--random-init", "--dataset", "cifar10", "--data-dir", cifar_dir,
                        "--epochs", "1", "--workers", "0", "--precompute", "--out", out))
    assert json.loads(out.read_text())["method"] == "random-init"


def test_byol_folder_end_to_end(folder_dir, tmp_path):
    out = tmp_path / "run"
    check_ok(run_script("byol.py", "--dataset", "folder", "--data-dir", folder_dir, "--image-size", "32",
                        "--batch-size", "8", "--out-dir", out, *TINY))
    check_ok(run_script("linear_eval.py", "--checkpoint", out, "--epochs", "2", "--workers", "0", "--precompute",
                        "--eval-split", "val"))
    res = json.loads((out / "linear_eval_val.json").read_text())
    assert res["dataset"] == "folder" and res["eval_split"] == "val" and res["encoder_unchanged"]


def test_help_lists_presets_and_sources():
    proc = check_ok(run_script("byol.py", "--help"))
    assert "Appendix B.2" in proc.stdout and "cifar10     300 epochs" in proc.stdout
    assert "--accum-steps" in proc.stdout and "per micro-batch" in proc.stdout


@pytest.mark.parametrize("script,flags,term", [
    ("byol_uniformity.py", ["--accum-steps", "2"], "uniformity"),
    ("byol_mhe.py", ["--pow", "a2"], "mhe"),
    ("byol_mhe.py", ["--pow", "0", "--mhe-on", "encoder,projector,predictor", "--mhe-weight", "1"], "mhe"),
    ("byol_mhe.py", ["--pow", "a2", "--mhe-on", "encoder,projector,predictor", "--no-batchnorm"], "mhe"),  # Table 4
])
def test_regularised_byol_end_to_end(cifar_dir, tmp_path, script, flags, term):
    out = tmp_path / "run"
    proc = check_ok(run_script(script, "--data-dir", cifar_dir, "--batch-size", "24", "--out-dir", out,
                               "--image-size", "16", *flags, *TINY))  # 16 px: a quarter of the CPU of 32 px
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row[term] == row[term] and "byol" in row and "eval_uniformity" in row
    args = json.loads((out / "args.json").read_text())
    if script == "byol_mhe.py":
        assert "Eq. 7" in proc.stdout and args["pow"] == flags[1]
        assert args["batchnorm"] == ("--no-batchnorm" not in flags)
        assert args["mhe_weight"] == (10.0 if "--mhe-weight" not in flags else 1.0)  # Appendix C.1 default
        assert args["mhe_on"] == (["projector", "predictor"] if "--mhe-on" not in flags else
                                  ["encoder", "projector", "predictor"])
        if "--no-batchnorm" in flags:  # the probe rebuilds the encoder without BatchNorm from the checkpoint
            check_ok(run_script("linear_eval.py", "--checkpoint", out, "--epochs", "1", "--workers", "0",
                                "--precompute"))
            assert json.loads((out / "linear_eval_test.json").read_text())["method"] == "byol_mhe"
    else:
        assert "Eq. 4" in proc.stdout and args["unif_weight"] == 0.125 and args["unif_on"] == "projector"
        assert "micro-batches of 12 images" in proc.stderr
        # the training term (Eq. 2 on the projections of the training batches) and the analysis measure (Eq. 2 on
        # the encoder features of fixed eval images) are both logged, each under its own name
        assert -4 <= row["uniformity"] <= 0 and -4 <= row["eval_uniformity"] <= 0
        assert row["uniformity"] != row["eval_uniformity"]
    if flags in (["--accum-steps", "2"], ["--pow", "a2"]):  # a run is resumed by the script that made it
        check_one_line_error(run_script("byol.py", "--resume", out), f"resume it with {script}")


@pytest.mark.parametrize("script,flags,text", [
    ("byol_mhe.py", ["--pow", "3"], "invalid choice: '3'"),
    ("byol_mhe.py", ["--mhe-on", "encoder,head"], "subset of encoder,projector,predictor"),
    ("byol_mhe.py", ["--mhe-on", ""], "subset of encoder,projector,predictor"),
    ("byol_uniformity.py", ["--unif-on", "predictor"], "invalid choice: 'predictor'"),
    ("simclr.py", ["--jitter-strength", "1.5"], "argument --jitter-strength: must be between 0 and 1.25"),
    ("simclr.py", ["--jitter-strength", "-0.1"], "argument --jitter-strength: must be between 0 and 1.25"),
    ("byol.py", ["--analysis-samples", "-1"], "argument --analysis-samples: must be 0 (off) or an integer >= 2"),
])
def test_bad_method_flags(script, flags, text, tmp_path):
    check_one_line_error(run_script(script, *flags, "--out-dir", tmp_path / "run"), text)
    assert not (tmp_path / "run").exists()


# --- bad input: one line on stderr, non-zero exit, nothing lost ---------------------------------------------------
@pytest.mark.parametrize("args,text", [
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--arch", "vgg11"], "invalid choice: 'vgg11'"),
    (["--batch-size", "10", "--accum-steps", "3"], "not divisible by --accum-steps 3"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer"),
    (["--dataset", "folder", "--augment", "batched"], "needs an in-memory dataset"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "cuda"),
])
def test_bad_arguments(args, text, tmp_path):
    check_one_line_error(run_script("byol.py", *args, "--data-dir", tmp_path, "--workers", "0",
                                    "--out-dir", tmp_path / "run"), text)
    assert not (tmp_path / "run").exists()


def test_missing_dataset_that_cannot_be_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")   # no network: the download fails at once
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    check_one_line_error(run_script("byol.py", "--data-dir", tmp_path / "nothing", "--workers", "0",
                                    "--out-dir", tmp_path / "run"), "cannot load cifar10")
    check_one_line_error(run_script("byol.py", "--dataset", "folder", "--data-dir", tmp_path / "nothing",
                                    "--out-dir", tmp_path / "run"), "expects image folders")
    assert not (tmp_path / "run").exists()


def test_linear_eval_bad_numbers(cifar_run):
    out, _ = cifar_run
    check_one_line_error(run_script("linear_eval.py", "--checkpoint", out, "--epochs", "0"), "argument --epochs: must be")


def test_bad_checkpoints(tmp_path, capsys):
    from test_bad_input import check_refused, run_main  # in this process: a script run costs seconds of CPU
    check_refused(run_main("linear_eval", ["--checkpoint", tmp_path / "missing.pt"], capsys), "does not exist")
    (tmp_path / "text.pt").write_text("hello")
    check_refused(run_main("linear_eval", ["--checkpoint", tmp_path / "text.pt"], capsys), "not a readable")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    check_refused(run_main("linear_eval", ["--checkpoint", tmp_path / "other.pt"], capsys),
                  "not a hyperreg checkpoint")
    check_one_line_error(run_script("byol.py", "--resume", tmp_path / "other.pt"), "not a hyperreg checkpoint")


def test_existing_run_is_not_overwritten(cifar_run, cifar_dir):
    out, _ = cifar_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    check_one_line_error(run_script("byol.py", "--data-dir", cifar_dir, "--batch-size", "16", "--out-dir", out,
                                    *TINY), "already holds a run")
    check_one_line_error(run_script("byol.py", "--data-dir", cifar_dir, "--batch-size", "16", "--accum-steps", "5",
                                    "--out-dir", out, *TINY), "not divisible")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_linear_eval_batched_needs_in_memory_data(folder_dir):
    check_one_line_error(run_script("linear_eval.py", "--random-init", "--dataset", "folder", "--data-dir",
                                    folder_dir, "--augment", "batched", "--workers", "0"), "in-memory dataset")
