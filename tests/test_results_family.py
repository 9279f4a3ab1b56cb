"""results.py's family table (issue 20): every method of one recipe side by side, and its figures."""
import csv
import importlib
import io
import math

import matplotlib
import pytest

import results
from test_results import section, table_line, write_run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHORT_PROBE = {"epochs": 5, "precompute": True}  # not Appendix D's probe: never averaged with it


def write_family(root):
    """Recipe 1 (CIFAR-10, ResNet-18, 300 epochs, batch 1024, the presets' recipe): BYOL (3 seeds, one evaluated
    with another probe), BYOL-MHE --pow 2 (3 seeds), SFRIK (1 seed), SimCLR (no probe), an unfinished BYOL-MHE.
    Apart: BYOL-MHE at batch 512 (another recipe, one method) and BYOL with another k-NN monitor (another recipe)."""
    byol = [dict(top1=90.0, last=dict(eval_uniformity=-2.0, eval_alignment=0.4, eval_mmd_legendre=0.01,
                                      eval_mhe_projector=0.5, knn_top1=80.0), ips=1000.0),
            dict(top1=92.0, last=dict(eval_uniformity=-2.2, eval_alignment=0.6, eval_mmd_legendre=0.03,
                                      eval_mhe_projector=0.7, knn_top1=84.0), ips=1100.0)]
    for seed, r in enumerate(byol):
        write_run(root, f"byol-{seed}", "byol", [], seed, evals=[{"top1": r["top1"], "top5": 99.5}],
                  images_per_s=r["ips"], last=r["last"])
    write_run(root, "byol-2", "byol", [], 2, evals=[{"top1": 60.0, **SHORT_PROBE}], last=dict(knn_top1=70.0))
    for seed, top1 in enumerate((91.0, 92.0, 96.0)):
        write_run(root, f"mhe-pow2-{seed}", "byol_mhe", ["--pow", "2"], seed, evals=[{"top1": top1}],
                  last=dict(eval_uniformity=-3.0 - seed / 10))
    write_run(root, "mhe-pow2-3", "byol_mhe", ["--pow", "2"], 3, done=120, evals=[{"top1": 10.0}])
    write_run(root, "sfrik-0", "sfrik", [], 0, evals=[{"top1": 89.0}], last=dict(eval_mhe_projector=1.25))
    write_run(root, "simclr-0", "simclr", [], 0, last=dict(knn_top1=85.0))
    for seed, top1 in enumerate((50.0, 51.0)):
        write_run(root, f"b512/mhe-{seed}", "byol_mhe", ["--batch-size", "512"], seed, evals=[{"top1": top1}])
    # seed 5: --knn-k does not change what is trained, so a seed 0 would be a second run of BYOL's seed 0
    write_run(root, "knn20/byol-5", "byol", ["--knn-k", "20"], 5, evals=[{"top1": 40.0}])
    return root


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = write_family(tmp_path_factory.mktemp("family"))
    notes = []
    found, _, _, _, groups = results.collect([root], notes)
    report, records = [], []
    results.family_tables(groups, report, records)
    return root, groups, "\n".join(report), records


def rows_of(text):
    table = text.split("| method |")[1]
    return [line for line in table.splitlines()[2:] if line.startswith("|")]


def test_one_row_per_method_and_setting_seeds_averaged(family):
    _, _, text, _ = family
    recipe = section(text, "### Recipe 1")
    assert recipe.startswith("### Recipe 1: cifar10, resnet18 (cifar stem), BatchNorm, 32 px, 300 epochs, batch 1024; "
                             "monitor on the test split (k-NN k = 200, T = 0.1; analysis of 1024 images)")
    # Hand-computed: two values d apart have the sample std d / sqrt(2). BYOL, probe A, seeds 0 and 1: top-1 90, 92
    # -> 91 +- sqrt(2); k-NN 80, 84 -> 82 +- 2 sqrt(2); G2 -2.0, -2.2 -> -2.1 +- 0.1 sqrt(2); MMD 0.01, 0.03 -> 0.02
    # +- 0.01 sqrt(2); alignment 0.4, 0.6 -> 0.5 +- 0.1 sqrt(2); MHE 0.5, 0.7 -> 0.6 +- 0.1 sqrt(2); images/s 1000,
    # 1100 -> 1050 +- 50 sqrt(2)
    s2 = math.sqrt(2)
    assert table_line(recipe, "BYOL*") == (
        f"| BYOL* | preset | A | 91.00 ± {s2:.2f} | 99.50 ± 0.00 | 82.00 ± {2 * s2:.2f} | -2.100 ± {0.1 * s2:.3f} "
        f"| 0.020 ± {0.01 * s2:.3f} | 0.500 ± {0.1 * s2:.3f} | 0.600 ± {0.1 * s2:.3f} | 1050 ± {50 * s2:.0f} "
        f"| 90.74 (Tables 4, 5, C.7, C.8) | 2 (0, 1) |")
    # BYOL-MHE --pow 2, seeds 0-2: top-1 91, 92, 96 -> 93 +- sqrt(7) (deviations -2, -1, 3); G2 -3.0, -3.1, -3.2 ->
    # -3.1 +- 0.1; the unfinished seed 3 (top-1 10) is not averaged in
    mhe = table_line(recipe, "BYOL-MHE")
    assert mhe.startswith(f"| BYOL-MHE | `--pow 2` | A | 93.00 ± {math.sqrt(7):.2f} | 99.00 ± 0.00 | 80.00 ± 0.00 "
                          f"| -3.100 ± 0.100 |")
    assert mhe.endswith("| 91.34 (Tables C.6, C.7) | 3 (0, 1, 2) |")  # --mhe-weight 10 is the preset's
    # one seed: no std
    assert table_line(recipe, "SFRIK").startswith("| SFRIK | preset | A | 89.00 | 99.00 | 80.00 | -2.000 |")
    assert "| 1.250 | 100 | - | 1 (0) |" in table_line(recipe, "SFRIK")


def test_rows_sorted_by_linear_top1_then_knn(family):
    _, _, text, _ = family
    rows = [line.split(" | ")[:3] for line in rows_of(section(text, "### Recipe 1"))]
    assert rows == [["| BYOL-MHE", "`--pow 2`", "A"], ["| BYOL*", "preset", "A"], ["| SFRIK", "preset", "A"],
                    ["| BYOL*", "preset", "B"], ["| SimCLR*", "preset", "-"]]
    simclr = rows_of(section(text, "### Recipe 1"))[-1]
    assert simclr.startswith("| SimCLR* | preset | - | - | - | 85.00 |")


def test_probes_and_monitors_that_differ_are_never_averaged(family):
    """BYOL seed 2's short probe is its own row (B); a BYOL run with another k-NN monitor is another recipe."""
    _, _, text, _ = family
    recipe = section(text, "### Recipe 1")
    assert "- A: test split; linear probe 80 epochs on augmented images (crop, flip), batch 100, base LR 0.2: " \
           "`--eval-split test --epochs 80 --batch-size 100 --lr 0.2`; the paper's (Appendix D)" in recipe
    assert "- B: test split; linear probe 5 epochs on precomputed features" in recipe
    assert "not the paper's (probe epochs 5 (paper: 80)" in recipe
    short = [line for line in rows_of(recipe) if line.startswith("| BYOL* | preset | B |")]
    assert len(short) == 1 and short[0].startswith("| BYOL* | preset | B | 60.00 | 99.00 | 70.00 |")
    assert short[0].endswith("| 1 (2) |")
    assert "40.00" not in recipe and "50.50" not in recipe  # the other recipes' runs


def test_a_recipe_of_one_method_is_not_a_comparison(family):
    _, _, text, _ = family
    assert text.count("### Recipe") == 1
    alone = text.split("Not a comparison (runs of one method only): ")[1]
    assert "cifar10, resnet18 (cifar stem), BatchNorm, 32 px, 300 epochs, batch 512; monitor on the test split " \
           "(k-NN k = 200, T = 0.1; analysis of 1024 images): byol_mhe, 2 run(s)" in alone
    assert "batch 1024; monitor on the test split (k-NN k = 20, T = 0.1; analysis of 1024 images): byol, 1 run(s)" \
        in alone


def test_the_recipe_is_written_out_to_rerun(family):
    _, _, text, records = family
    train = ("--dataset cifar10 --arch resnet18 --stem cifar --image-size 32 --epochs 300 --batch-size 1024 "
             "--eval-split test --knn-k 200 --knn-t 0.1 --analysis-samples 1024")
    assert f"Train each row with `python <method>.py {train} <settings> --seed S`" in section(text, "### Recipe 1")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=results.CSV_FIELDS)
    w.writeheader()
    w.writerows(records)
    rows = [r for r in csv.DictReader(io.StringIO(buf.getvalue())) if r["section"] == "family"]
    assert {r["table"] for r in rows} == {train}
    g2 = [r for r in rows if r["row"] == "BYOL*" and r["protocol"].startswith("test split; linear probe 80")
          and r["measure"] == "eval_uniformity"]
    assert len(g2) == 1 and g2[0]["n"] == "2" and g2[0]["seeds"] == "0 1"
    assert float(g2[0]["mean"]) == pytest.approx(-2.1) and float(g2[0]["std"]) == pytest.approx(0.1 * math.sqrt(2))
    top1 = next(r for r in rows if r["row"] == "BYOL-MHE --pow 2" and r["measure"] == "top1")
    assert top1["paper"] == "91.34 (Tables C.6, C.7)" and top1["papers_protocol"] == "True"
    assert top1["commands"] == (f"python byol_mhe.py {train} --pow 2 --seed S; python linear_eval.py --checkpoint "
                                f"runs/RUN --eval-split test --epochs 80 --batch-size 100 --lr 0.2")


def test_plane_and_curves_hold_one_point_per_finished_run(family, tmp_path, monkeypatch):
    """Read back from the figures written: 8 finished runs in recipe 1 (3 BYOL, 3 BYOL-MHE, SFRIK, SimCLR), the
    unfinished one not drawn."""
    _, groups, _, _ = family
    saved = {}
    savefig = matplotlib.figure.Figure.savefig

    def keep(fig, path, **kw):
        saved[path.name] = fig
        return savefig(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    written = []
    results.family_figures(plt, groups, tmp_path, written)
    assert [p.name for p, _ in written] == ["family1_plane.png", "family1_curves.png"]
    for p, _ in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = saved["family1_plane.png"].axes
    points = [tuple(xy) for c in ax.collections for xy in c.get_offsets()]
    assert len(points) == 8
    assert sorted(points)[:3] == pytest.approx([(-3.2, 0.5), (-3.1, 0.5), (-3.0, 0.5)])  # BYOL-MHE's three
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(["90.0", "92.0", "60.0", "91.0", "92.0", "96.0", "89.0", "k-NN 85.0"])
    assert len({tuple(c.get_facecolor()[0]) for c in ax.collections}) == 4  # a colour per method
    uniformity, knn = saved["family1_curves.png"].axes
    for panel in (uniformity, knn):
        assert len(panel.lines) == 8 and all(len(line.get_xdata()) == 6 for line in panel.lines)  # epochs 50 .. 300
    assert sorted(line.get_ydata()[-1] for line in knn.lines) == [70.0, 80.0, 80.0, 80.0, 80.0, 80.0, 84.0, 85.0]


def test_the_commands_of_docs_family_md_make_one_recipe_of_every_method_at_its_preset():
    """docs/family.md's training commands, read by each script's own parse_args: one recipe (CIFAR-10, ResNet-18,
    300 epochs, batch 1024), every method of the family, each at its preset but for the Legendre kernel."""
    text = (results.ROOT / "docs" / "family.md").read_text()
    block = text.split("```\n")[1]
    recipe_flags = block.splitlines()[0].split('"')[1].split()
    commands = [line.split() for line in block.splitlines() if line.strip().startswith("python ")]
    train = [c for c in commands if c[1] not in ("linear_eval.py", "results.py")]
    recipes, rows = set(), set()
    for _, script, *argv in train:
        assert argv[0] == "$R" and argv[-4:-2] == ["--seed", "$S"] and argv[-2] == "--out-dir", argv
        args = results.parsed_args(script.removesuffix(".py"), tuple(recipe_flags + argv[1:-4] + ["--seed", "0"]))
        recipes.add(results.recipe_of(args))
        rows.add((args["method"], results.settings(args)))
    assert recipes == {results.recipe_of(results.parsed_args("byol", ("--dataset", "cifar10")))}
    assert dict(next(iter(recipes)))["batch_size"] == 1024 and dict(next(iter(recipes)))["epochs"] == 300
    assert rows == {(m, ()) for m in results.FAMILY_METHODS} | {
        ("byol_uniformity", (("legendre_weights", (1.0, 40.0, 40.0)), ("uniformity", "legendre")))}
    # the probe is linear_eval.py's defaults: Appendix D's (probe A of the family table)
    probe = block.split("python linear_eval.py ")[1].split(";")[0].split()
    assert probe == ["--checkpoint", '"$run"']
    defaults = vars(importlib.import_module("linear_eval").build_parser().parse_args(["--checkpoint", "run"]))
    assert {k: defaults[k] for k in ("eval_split", "epochs", "batch_size", "lr", "precompute")} == \
        {k: v for k, v in results.PAPER_PROBE.items() if k != "lr_scaled"}
