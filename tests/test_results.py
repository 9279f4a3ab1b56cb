"""results.py: run folders -> the paper's tables (ours beside the paper's) and figures."""
import csv
import importlib
import json
import math
import shutil

import matplotlib
import matplotlib.figure
import pytest

import common
import results
from conftest import run_script
from test_cli import check_ok

BLOCKS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]  # ResNet-18's eight blocks (Fig. 4)


def write_run(root, name, script, argv=(), seed=0, done=None, evals=(), steps_per_epoch=48, images_per_s=100.0,
              last=None):
    """A run folder as the scripts write it: args.json (the script's own parse_args), metrics.jsonl (one line per
    epoch, the analysis every 50 epochs; `last` updates the last row) and linear_eval JSONs (dicts of
    top1/top5/knn_top1, plus any field)."""
    args = vars(importlib.import_module(script).parse_args([*argv, "--seed", str(seed)]))
    folder = root / name
    folder.mkdir(parents=True)
    args["out_dir"] = str(folder)
    (folder / "args.json").write_text(json.dumps(args, indent=2))
    done = args["epochs"] if done is None else done
    lines, shift = [], {"byol": 0.3, "byol_uniformity": 0.15}.get(script, 0.0)  # curves apart in the figures
    for e in range(1, done + 1):
        row = {"epoch": e, "step": e * steps_per_epoch, "loss": 4 / e + seed, "byol": 3 / e, "lr": 0.1, "tau": 0.99,
               "seconds": 1.0, "images_per_s": images_per_s}
        if script == "byol_mhe":
            row["mhe"] = 1 / e
        if e % 50 == 0 or e == done:
            row.update(knn_top1=50 + e / 10 - 10 * shift, eval_uniformity=-1 - e / 300 + shift, eval_alignment=0.5,
                       eval_mmd_legendre=0.1 + shift - e / 3000,
                       **{f"eval_mhe_{p}": 0.5 + 0.1 * i + shift - e / 3000
                          for i, p in enumerate(("encoder", "projector", "predictor"))},
                       **{f"eval_energy_{b}": 1 + k / 10 - e / 1000 + shift for k, b in enumerate(BLOCKS)})
        if e == done and last:
            row.update(last)
        lines.append(json.dumps(row))
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if done == args["epochs"]:
        (folder / "encoder.pt").write_bytes(b"")  # written at the end of a run
    for i, ev in enumerate(evals):
        split = ev.pop("eval_split", "test")
        result = {"checkpoint": str(folder / "last.pt"), "method": args["method"], "dataset": args["dataset"],
                  "eval_split": split, "top5": 99.0, "knn_top1": 80.0, "knn_k": 200, "knn_t": 0.1, "epochs": 80,
                  "batch_size": 100, "lr": 0.2, "effective_lr": 0.078125, "precompute": False, **ev}
        result = {k: v for k, v in result.items() if v is not None}  # None: a field this JSON lacks
        suffix = f"-{i + 1}" if i and any(e.get("eval_split", "test") == split for e in evals[:i]) else ""
        (folder / f"linear_eval_{split}{suffix}.json").write_text(json.dumps(result))
    return folder


def write_runs(root):
    """16 runs (one unfinished) covering rows of Tables 4, 5, C.6, C.7, C.8, other runs, and a folder of notes."""
    for seed, top1 in enumerate((90.0, 91.0, 92.0)):  # Table 5 'encoder': mean 91, sample std 1
        write_run(root, f"t5-encoder-{seed}", "byol_mhe", ["--mhe-on", "encoder"], seed, evals=[{"top1": top1}])
    write_run(root, "t5-encoder-3", "byol_mhe", ["--mhe-on", "encoder"], 3, done=100, evals=[{"top1": 10.0}])
    for seed, top1 in enumerate((89.5, 90.5)):  # Table C.6 lambda 0.01: mean 90, std sqrt(0.5)
        write_run(root, f"c6/w0.01-{seed}", "byol_mhe", ["--pow", "2", "--mhe-weight", "0.01"], seed,
                  evals=[{"top1": top1}])
    # Table C.8 / Fig. 8: micro-batches of 1024 and 512 (BYOL), 1024 and 256 (BYOL-MHE), 1024 (BYOL + L_uni)
    for seed, (a, b) in enumerate(((90.0, 88.0), (91.0, 88.0))):
        write_run(root, f"c8/byol-1-{seed}", "byol", [], seed, evals=[{"top1": a}])
        write_run(root, f"c8/byol-2-{seed}", "byol", ["--accum-steps", "2"], seed, evals=[{"top1": b}])
    write_run(root, "c8/mhe-1", "byol_mhe", [], 0, evals=[{"top1": 91.5}])
    write_run(root, "c8/mhe-4", "byol_mhe", ["--accum-steps", "4"], 0, evals=[{"top1": 88.5}])
    write_run(root, "c8/uni-1", "byol_uniformity", [], 0, evals=[{"top1": 91.0}])
    # evaluated on the held-out val split, and on test by a 5-epoch precomputed probe: neither is the paper's column
    write_run(root, "val-eval", "byol_mhe", ["--mhe-on", "predictor"], 0,
              evals=[{"top1": 77.0, "eval_split": "val"}, {"top1": 66.0, "epochs": 5, "precompute": True}])
    write_run(root, "other", "byol_mhe", ["--pow", "2", "--mhe-weight", "5"], 0, evals=[{"top1": 80.0}])
    broken = write_run(root, "not-evaluated", "byol_mhe", ["--mhe-on", "projector"], 0)
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 301, "st')  # a line cut short by a crash
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return write_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    proc = check_ok(run_script("results.py", runs, "--out", out))
    return proc, out


def section(text, title):
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def table_line(text, first_cell):
    return next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))


def test_rows_are_grouped_over_seeds_and_averaged(report):
    (proc, out) = report
    t5 = section(proc.stdout, "## Table 5")
    paper_protocol = t5.split("Protocol:")[1]  # the first table is the paper's protocol
    assert "the paper's." in paper_protocol.splitlines()[0]
    line = table_line(paper_protocol, "encoder")
    assert "| 90.96 | 91.00 ± 1.00 | 3 (0, 1, 2) |" in line  # hand-computed: mean 91, sample std 1
    c6 = table_line(section(proc.stdout, "## Table C.6"), "lambda_MHE = 0.01")
    assert f"| 91.12 | 90.00 ± {math.sqrt(0.5):.2f} | 2 (0, 1) |" in c6
    rows = list(csv.DictReader(open(out / "results.csv")))
    enc = [r for r in rows if r["table"] == "Table 5" and r["row"] == "encoder" and r["papers_protocol"] == "True"]
    assert len(enc) == 1 and float(enc[0]["mean"]) == 91.0 and float(enc[0]["std"]) == 1.0 and enc[0]["n"] == "3"
    # a BYOL run fills every table where BYOL is a row (Tables 4, 5, C.7, C.8): 90.00 and 91.00 -> 90.50
    for table in ("## Table 4", "## Table 5", "## Table C.7"):
        assert "| 90.74 | 90.50 ± 0.71 | 2 (0, 1) |" in section(proc.stdout, table)


def test_unfinished_runs_are_listed_not_averaged(report):
    proc, _ = report
    unfinished = section(proc.stdout, "## Unfinished runs")
    assert "t5-encoder-3" in unfinished and "| 100 / 300 |" in unfinished and "--mhe-on encoder" in unfinished
    assert "10.00" not in section(proc.stdout, "## Table 5")
    assert "# Results: 15 finished run(s), 1 unfinished" in proc.stdout


def test_missing_rows_show_their_commands(report):
    proc, _ = report
    c6 = section(proc.stdout, "## Table C.6")
    assert "- lambda_MHE = 0.001: `python byol_mhe.py --pow 2 --mhe-weight 0.001 --seed S  (S = 0, 1, 2)`" in c6
    assert "lambda_MHE = 0.01:" not in c6.split("no finished runs yet")[1]
    t5 = section(proc.stdout, "## Table 5")
    assert "Finished, not evaluated yet" in t5 and "not-evaluated" in t5
    assert "## Table 1" not in proc.stdout and "## Table 3" not in proc.stdout  # no run covers them


def test_val_split_and_other_protocols_stay_out_of_the_papers_column(report):
    proc, _ = report
    t5 = section(proc.stdout, "## Table 5")
    tables = t5.split("Protocol:")[1:]
    assert "test split" in tables[0].splitlines()[0] and "the paper's." in tables[0].splitlines()[0]
    assert table_line(tables[0], "predictor").endswith("| 91.10 | - | - |")
    val = next(t for t in tables if t.startswith(" val split"))
    assert "**not the paper's**: split val (paper: test)" in val and "| 91.10 | 77.00 | 1 (0) |" in val
    short = next(t for t in tables if "precomputed" in t.splitlines()[0])
    assert "probe epochs 5 (paper: 80)" in short and "| 91.10 | 66.00 | 1 (0) |" in short


def test_runs_that_match_no_row_are_other_runs(report):
    proc, _ = report
    other = section(proc.stdout, "## Other runs")
    assert "`byol_mhe.py --dataset cifar10 --epochs 300 --mhe-weight 5.0 --pow 2`" in other and "80.00" in other
    assert "--mhe-on encoder" not in other  # those are Table 5's


def test_each_figure_is_written(report):
    proc, out = report
    pngs = ["fig4_cifar10.png", "fig5_cifar10.png", "fig6_cifar10.png", "fig8.png"]
    pngs += [f"loss_curves/{p.name}" for p in (out / "loss_curves").iterdir()]
    assert len(pngs) == 4 + 16  # one loss curve per run, the unfinished one included
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert f"`{name}`" in (out / "results.md").read_text()
    assert (out / "results.md").read_text().startswith("# Results")
    assert "encoder.pt" not in (out / "runs.csv").read_text() and "t5-encoder-3" in (out / "runs.csv").read_text()


def test_a_folder_that_is_not_a_run_is_skipped_with_a_note(report, runs):
    proc, _ = report
    notes = [line for line in proc.stderr.splitlines() if "notes" in line]
    assert notes == [f"note: skipped {runs / 'notes'}: not a run folder (no args.json)"]
    assert f"note: {runs / 'not-evaluated'}: ignored 1 unreadable line(s) of metrics.jsonl" in proc.stderr


@pytest.mark.parametrize("argv,text", [
    (["empty"], "no run folders (folders with args.json) under empty"),
    (["missing"], "missing is not a folder"),
    (["empty", "--out", "file"], "--out file is a file"),
    (["run", "--out", "file/sub"], "cannot write into --out file/sub"),
])
def test_empty_folder_and_bad_paths(tmp_path, monkeypatch, capsys, argv, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    write_run(tmp_path, "run", "byol", [], 0, done=1)
    with pytest.raises(SystemExit) as exit:
        common.cli(lambda: results.main(argv))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and text in err, err


def test_real_tiny_runs(cifar_dir, tmp_path, capsys, monkeypatch):
    """Real BYOL-MHE and SimCLR runs of one tiny recipe (16 px, batch 16, 1 epoch), BYOL-MHE linearly evaluated, as
    the scripts write them, read back: into "Other runs" and into the family table and its figures."""
    runs = tmp_path / "runs"
    mhe, simclr = runs / "tiny", runs / "tiny-simclr"
    small = ["--batch-size", "16", "--image-size", "16", "--epochs", "1", "--workers", "0", "--proj-dim", "32"]
    check_ok(run_script("byol_mhe.py", "--data-dir", cifar_dir, "--out-dir", mhe, *small, "--hidden-dim", "64"))
    check_ok(run_script("simclr.py", "--data-dir", cifar_dir, "--out-dir", simclr, *small))
    check_ok(run_script("linear_eval.py", "--checkpoint", mhe, "--epochs", "1", "--workers", "0", "--precompute"))
    result = json.loads((mhe / "linear_eval_test.json").read_text())
    saved, savefig = {}, matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: (saved.__setitem__(path.name, fig), savefig(fig, path, **kw))[1])
    assert results.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    other = section(out, "## Other runs")
    assert "--epochs 1 --batch-size 16 --hidden-dim 64 --image-size 16 --proj-dim 32" in other
    assert f"| {result['top1']:.2f} | {result['top5']:.2f} | {result['knn_top1']:.2f} |" in other
    assert "linear probe 1 epoch on precomputed features" in other
    assert (tmp_path / "out" / "loss_curves" / "tiny.png").stat().st_size > 5000
    # the columns Figs. 4-6 and the family table read are the ones a run writes
    rows = {run: json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in (mhe, simclr)}
    for key in ("knn_top1", "eval_uniformity", "eval_mmd_legendre", "eval_alignment", "eval_mhe_encoder",
                "eval_mhe_projector", "eval_mhe_predictor", *[f"eval_energy_{b}" for b in BLOCKS]):
        assert isinstance(rows[mhe][key], float), key
    family = section(out, "### Recipe 1")
    assert family.startswith("### Recipe 1: cifar10, resnet18 (cifar stem), BatchNorm, 16 px, 1 epoch, batch 16; "
                             "monitor on the test split (k-NN k = 200, T = 0.1; analysis of 1024 images)")
    assert "- A: test split; linear probe 1 epoch on precomputed features, batch 100, base LR 0.2: " \
           "`--eval-split test --epochs 1 --batch-size 100 --lr 0.2 --precompute`; not the paper's" in family

    def measures(row):
        return (f"{row['knn_top1']:.2f} | {row['eval_uniformity']:.3f} | {row['eval_mmd_legendre']:.3f} | "
                f"{row['eval_alignment']:.3f} | {row['eval_mhe_projector']:.3f} | {row['images_per_s']:.0f} | - | "
                f"1 (0) |")
    assert table_line(family, "BYOL-MHE") == (f"| BYOL-MHE | `--hidden-dim 64 --proj-dim 32` | A | "
                                              f"{result['top1']:.2f} | {result['top5']:.2f} | {measures(rows[mhe])}")
    assert table_line(family, "SimCLR*") == f"| SimCLR* | `--proj-dim 32` | - | - | - | {measures(rows[simclr])}"
    (plane,) = saved["family1_plane.png"].axes
    assert sorted(tuple(xy) for c in plane.collections for xy in c.get_offsets()) == sorted(
        (row["eval_uniformity"], row["eval_alignment"]) for row in rows.values())
    assert [len(ax.lines) for ax in saved["family1_curves.png"].axes] == [2, 2]
    for name in ("family1_plane.png", "family1_curves.png"):
        assert f"`{name}`: Recipe 1: " in (tmp_path / "out" / "results.md").read_text()


def test_table_1_keeps_the_knn_protocol_and_the_latest_evaluation(tmp_path, capsys):
    """Table 1's k-NN column is DINO's (k = 20, T = 0.07); a second evaluation with the same protocol
    (linear_eval_test-3.json after -2) replaces the earlier one, one with another protocol stays apart."""
    dino = {"knn_k": 20, "knn_t": 0.07}
    write_run(tmp_path, "in1k", "byol", ["--dataset", "imagenet", "--epochs", "1000"], 0, steps_per_epoch=2,
              evals=[{"top1": 70.0, "knn_top1": 50.0}, {"top1": 73.0, "knn_top1": 60.0, **dino},
                     {"top1": 74.0, "knn_top1": 62.0, **dino}])
    assert results.main([str(tmp_path)]) == 0
    t1 = section(capsys.readouterr().out, "## Table 1")
    ours, other = t1.split("Protocol:")[1:]
    assert "k-NN k = 20, T = 0.07; the paper's." in ours.splitlines()[0]
    assert table_line(ours, "BYOL*").endswith("| 74.10 | 74.00 | 63.70 | 62.00 | 1 (0) |")
    assert "**not the paper's**: k-NN k = 200, T = 0.1 (paper: k = 20, T = 0.07)" in other
    assert table_line(other, "BYOL*").endswith("| 74.10 | 70.00 | 63.70 | 50.00 | 1 (0) |")
    assert "`python byol_mhe.py --dataset imagenet --epochs 1000 --data-dir <imagenet> --knn-k 20 --knn-t 0.07`" in t1


def test_a_probe_from_before_the_lr_scaling_is_not_the_papers(tmp_path, capsys):
    """A linear_eval JSON without effective_lr trained at its lr unscaled (2.56x Appendix D's at batch 100): its
    'lr': 0.2 must not put it in the paper's column."""
    write_run(tmp_path, "old", "byol", [], 0, evals=[{"top1": 80.0, "effective_lr": None}])
    write_run(tmp_path, "new", "byol", [], 1, evals=[{"top1": 90.0}])
    assert results.main([str(tmp_path)]) == 0
    t5 = section(capsys.readouterr().out, "## Table 5")
    ours, other = t5.split("Protocol:")[1:]
    assert "the paper's." in ours.splitlines()[0] and table_line(ours, "no MHE (BYOL)").endswith("| 1 (1) |")
    assert "probe LR unscaled (linear_eval.py before the LR scaling) (paper: x batch / 256)" in other
    assert "| 80.00 |" in table_line(other, "no MHE (BYOL)")


def test_a_run_without_its_final_encoder_is_not_finished(tmp_path, capsys):
    """Killed after its last metrics row but before the checkpoint and encoder.pt that end it: not finished."""
    run = write_run(tmp_path, "cut", "byol", [], 0, evals=[{"top1": 90.0}])
    (run / "encoder.pt").unlink()
    assert results.main([str(tmp_path)]) == 0
    assert "| 300 / 300 |" in section(capsys.readouterr().out, "## Unfinished runs")


def test_an_evaluation_of_an_earlier_epoch_is_ignored(tmp_path, capsys):
    """linear_eval.py records the checkpoint's epoch: an evaluation made before the run finished is not its result."""
    write_run(tmp_path, "early", "byol", [], 0, evals=[{"top1": 90.0}, {"top1": 50.0, "checkpoint_epoch": 120}])
    assert results.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "linear_eval_test-2.json: evaluates the checkpoint of epoch 120 of 300, not the finished run" in err
    assert "| 90.00 |" in table_line(section(out, "## Table 5"), "no MHE (BYOL)")


# ----------------------------------------------------------------------------------------------------------------
# Issue 18: never a run counted twice, never a crash on a wrong-typed field, never an earlier report replaced
# ----------------------------------------------------------------------------------------------------------------
def two_byol_seeds(root):
    """BYOL seeds 0 and 1 at its preset (Table 5's 'no MHE' row): top-1 90 and 92, mean 91, sample std sqrt(2)."""
    return [write_run(root, f"byol-{seed}", "byol", [], seed, evals=[{"top1": top1}])
            for seed, top1 in enumerate((90.0, 92.0))]


TWO_SEEDS = f"| 90.74 | 91.00 ± {math.sqrt(2):.2f} | 2 (0, 1) |"


def byol_row(out):
    return table_line(section(out, "## Table 5"), "no MHE (BYOL)")


def test_a_symlink_loop_is_read_once(tmp_path, capsys):
    """loop -> . made one run 41 seeds (0, 0, ...) with ± 0.00: each real folder is visited once."""
    two_byol_seeds(tmp_path / "runs")
    (tmp_path / "runs" / "loop").symlink_to(".")
    (tmp_path / "runs" / "byol-0" / "up").symlink_to("..")  # a loop from inside a run folder: never entered
    assert results.main([str(tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert byol_row(out).endswith(TWO_SEEDS)
    assert f"note: {tmp_path / 'runs' / 'loop'}: the same folder as {tmp_path / 'runs'}" in err


@pytest.mark.parametrize("given,first", [(("runs", "runs"), "runs"), (("runs", "runs/byol-0"), "runs/byol-0"),
                                         (("runs/byol-1", "link"), "runs/byol-1")])
def test_a_folder_given_twice_is_read_once(tmp_path, monkeypatch, capsys, given, first):
    """The same folder given twice, inside a folder given too, or through a link to it: one run."""
    monkeypatch.chdir(tmp_path)
    two_byol_seeds(tmp_path / "runs")
    (tmp_path / "link").symlink_to(tmp_path / "runs" / "byol-1")
    assert results.main(list(given)) == 0
    out, err = capsys.readouterr()
    if given[0] == "runs":
        assert byol_row(out).endswith(TWO_SEEDS)
    else:
        assert byol_row(out).endswith("| 90.74 | 92.00 | 1 (1) |")
    assert err == f"note: {given[1]}: the same folder as {first} (a link, or a path given twice), read once\n"


def test_a_copy_of_a_run_is_counted_once_and_reported_with_both_paths(tmp_path, capsys):
    """cp -r run run.bak made n = 2. A copy has the same args.json (out_dir apart) and the same metrics rows; the
    copy with the most evaluations is counted (here the backup, evaluated after the copy was made). A setting of
    no paper row (--hidden-dim 8): no paper figure to draw, only the two loss curves."""
    runs = tmp_path / "runs"
    run = write_run(runs, "byol-0", "byol", ["--hidden-dim", "8"], 0)
    backup = runs / "byol-0.bak"
    shutil.copytree(run, backup)
    edit_json(backup / "args.json", out_dir=str(backup))  # as if resumed from there
    other = write_run(runs, "byol-1", "byol", ["--hidden-dim", "8"], 1, evals=[{"top1": 92.0}])
    (backup / "linear_eval_test.json").write_text((other / "linear_eval_test.json").read_text().replace("92.0", "90.0"))
    assert results.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert f"| 91.00 ± {math.sqrt(2):.2f} | 99.00 ± 0.00 | 80.00 ± 0.00 | 77.00 ± 0.00 (test, k = 200, T = 0.1) " \
           f"| 2 (0, 1) |" in section(out, "## Other runs")
    assert "# Results: 2 finished run(s), 0 unfinished; 1 duplicate(s) set apart" in out
    assert f"| {backup} | {run} |" in section(out, "## Duplicates")  # counted, copy
    assert err == f"note: {run}: a copy of {backup} (the same args.json and metrics.jsonl), counted once\n"
    rows = {r["run"]: r["counted"] for r in csv.DictReader(open(tmp_path / "out" / "runs.csv"))}
    assert rows == {str(run): f"no: a copy of {backup}", str(backup): "yes", str(other): "yes"}
    assert sorted(p.name for p in (tmp_path / "out" / "loss_curves").iterdir()) == ["byol-0.bak.png", "byol-1.png"]


def test_two_runs_with_the_same_seed_and_settings_are_never_averaged(tmp_path, capsys):
    """Two different trainings (not copies) with the same settings and seed are not two seeds: neither is averaged
    in, and both are listed with their paths."""
    two_byol_seeds(tmp_path / "runs")
    again = write_run(tmp_path / "runs", "byol-0-again", "byol", [], 0, steps_per_epoch=49, evals=[{"top1": 80.0}])
    assert results.main([str(tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert byol_row(out).endswith("| 90.74 | 92.00 | 1 (1) |")
    dup = section(out, "## Duplicates")
    first = tmp_path / "runs" / "byol-0"
    assert f"| 0 | {first} | {again} |" in dup and f"| 0 | {again} | {first} |" in dup
    assert f"note: {first}, {again}: different runs with the same settings and seed 0" in err


def test_the_stem_auto_gives_is_the_same_setting_and_its_seeds_are_not_counted_twice(tmp_path, capsys):
    """--stem cifar on CIFAR-10 trains the preset's encoder (--stem auto): its seed 1 is Table 5's, and its seed 0
    is a second run of the preset's seed 0, not another seed."""
    runs = tmp_path / "runs"
    first = write_run(runs, "byol-0", "byol", [], 0, evals=[{"top1": 90.0}])
    write_run(runs, "byol-1-cifar-stem", "byol", ["--stem", "cifar"], 1, evals=[{"top1": 92.0}])
    again = write_run(runs, "byol-0-cifar-stem", "byol", ["--stem", "cifar"], 0, evals=[{"top1": 80.0}])
    assert results.main([str(runs)]) == 0
    out, _ = capsys.readouterr()
    assert byol_row(out).endswith("| 90.74 | 92.00 | 1 (1) |")
    assert f"| 0 | {again} | {first} |" in section(out, "## Duplicates")


def edit_metrics_row(run, index, **fields):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[index] = json.dumps({**json.loads(lines[index]), **fields})
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def edit_json(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("field,value,problem", [
    ("top1", "90", 'top1 is "90", not a number'),
    ("knn_k", [200], "knn_k is [200], not an integer"),
    ("checkpoint_epoch", "300", 'checkpoint_epoch is "300", not an integer'),
    ("precompute", "no", 'precompute is "no", not true or false'),
    ("top1", True, "top1 is true, not a number"),
])
def test_an_evaluation_with_a_wrong_typed_field_is_skipped_with_a_note(tmp_path, capsys, field, value, problem):
    """Each of these crashed the whole report (a str in the mean, an unhashable protocol, a str compared with the
    run's epochs); a bool where a number belongs would count as 0 or 1."""
    runs = two_byol_seeds(tmp_path / "runs")
    edit_json(runs[1] / "linear_eval_test.json", **{field: value})
    assert results.main([str(tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert byol_row(out).endswith("| 90.74 | 90.00 | 1 (0) |")
    assert err.splitlines() == [f"note: {runs[1] / 'linear_eval_test.json'}: not a linear_eval result ({problem}), "
                                f"ignored"]


@pytest.mark.parametrize("index,fields,note", [
    (-1, {"epoch": "300"}, 'line 300: epoch is "300", not an integer'),
    (-1, {"epoch": True}, "line 300: epoch is true, not an integer"),
    (-1, {"knn_top1": "x"}, 'line 300: knn_top1 is "x", not a number'),
    (49, {"eval_uniformity": [1]}, "line 50: eval_uniformity is [1], not a number"),
])
def test_a_metrics_row_with_a_wrong_typed_field_is_skipped_with_a_note(tmp_path, capsys, index, fields, note):
    """The line is ignored as an unreadable line is: a run whose last row is ignored is not finished (its k-NN
    monitor, in a str, crashed the mean; an epoch in a str crashed the report)."""
    runs = [write_run(tmp_path / "runs", f"other-{seed}", "byol", ["--hidden-dim", "8"], seed,
                      evals=[{"top1": 80.0 + seed}]) for seed in (0, 1)]
    edit_metrics_row(runs[1], index, **fields)
    assert results.main([str(tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"note: {runs[1]}: ignored 1 line(s) of metrics.jsonl with a field of the wrong "
                                f"type ({note})"]
    other = table_line(section(out, "## Other runs"), "`byol.py --dataset cifar10 --epochs 300 --hidden-dim 8`")
    if index == -1:
        assert other.endswith("| 80.00 | 99.00 | 80.00 | 77.00 (test, k = 200, T = 0.1) | 1 (0) |")
        assert "| 299 / 300 |" in section(out, "## Unfinished runs")
    else:  # a row in the middle: the run is finished, its curve lacks a point
        assert other.endswith(f"| 80.50 ± {math.sqrt(0.5):.2f} | 99.00 ± 0.00 | 80.00 ± 0.00 | 77.00 ± 0.00 (test, "
                              f"k = 200, T = 0.1) | 2 (0, 1) |")


@pytest.mark.parametrize("fields,note", [
    ({"dataset": "mnist"}, "byol.py of this checkout refuses args.json's --dataset mnist --epochs 300 (argument "
                           "--dataset: invalid choice: 'mnist'"),
    ({"epochs": True}, "unreadable args.json (epochs is true, not a positive integer)"),
    ({"epochs": 0}, "unreadable args.json (epochs is 0, not a positive integer)"),
    ({"seed": "x"}, 'unreadable args.json (seed is "x", not an integer)'),
    ({"mhe_on": {"a": 1}}, None),  # an object where a list belongs: a setting like any other, no crash
])
def test_an_args_json_that_cannot_be_read_gives_a_clean_note(tmp_path, capsys, fields, note):
    """No stray 'error:' line from the method's parser, and no '(no byol.py here ...)' for a script that is here."""
    runs = two_byol_seeds(tmp_path / "runs")
    edit_json(runs[1] / "args.json", **fields)
    with pytest.raises(SystemExit) as exit:
        common.cli(lambda: results.main([str(tmp_path / "runs")]))
    out, err = capsys.readouterr()
    assert exit.value.code == 0 and "error" not in err and "no byol.py here" not in out, err
    if note:
        assert len(err.splitlines()) == 1 and err.startswith(f"note: skipped {runs[1]}: {note}"), err
        assert byol_row(out).endswith("| 90.74 | 90.00 | 1 (0) |")
    else:
        assert "mhe_on=(('a', 1),)" in section(out, "## Other runs")


def test_out_never_replaces_an_earlier_report(tmp_path, capsys):
    """A second report into the same --out goes beside the first (results-2/), as linear_eval.py's -2.json."""
    runs = tmp_path / "runs"
    write_run(runs, "byol-0", "byol", [], 0, done=1)  # one unfinished run: quick to draw
    assert results.main([str(runs), "--out", str(tmp_path / "results")]) == 0
    first = {p.relative_to(tmp_path / "results"): p.read_bytes() for p in (tmp_path / "results").rglob("*")
             if p.is_file()}
    write_run(runs, "byol-1", "byol", [], 1, done=2)
    capsys.readouterr()
    assert results.main([str(runs), "--out", str(tmp_path / "results")]) == 0
    out, err = capsys.readouterr()
    assert f"note: --out {tmp_path / 'results'} holds an earlier report, kept; this one goes to " \
           f"{tmp_path / 'results-2'}" in err
    assert {p.relative_to(tmp_path / "results"): p.read_bytes() for p in (tmp_path / "results").rglob("*")
            if p.is_file()} == first
    assert "0 finished run(s), 2 unfinished" in (tmp_path / "results-2" / "results.md").read_text()
    assert (tmp_path / "results-2" / "loss_curves" / "byol-1.png").is_file()
    (tmp_path / "results-3").mkdir()  # taken (even empty): the next free name
    assert results.main([str(runs), "--out", str(tmp_path / "results")]) == 0
    assert (tmp_path / "results-4" / "results.md").is_file() and not any((tmp_path / "results-3").iterdir())
