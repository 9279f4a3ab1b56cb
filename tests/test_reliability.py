"""Reliability (issue 18, items 2, 4, 8, 10, 12, 14) and the author's residual BatchNorm start (issue 19, item 4):
images counted once, a probe that diverged in one step, out of memory while building the model, a diverging MSBReg
run, regulariser settings that do nothing, the CPU warning, --help as the command line reads it, and
--no-zero-init-residual."""
import json
import os
import shlex
import sys

import pytest
import torch
import torchvision

import byol
import byol_mhe
import byol_uniformity
import common
import linear_eval
import loop
import msbreg
import results
import sfrik
import simclr
from conftest import TinyEncoder, write_folder
from test_bad_input import check_refused, run_main
from test_results import section, table_line, write_run
from test_training import tiny_argv


# --- 18.2: every image once, and the number of images said at the start --------------------------------------------
def test_a_symbolic_link_loop_in_an_image_folder_is_refused(tmp_path):
    data = write_folder(tmp_path / "data", classes=2, n_train=2, n_val=1, size=8)
    os.symlink(".", data / "train" / "c0" / "loop")  # ImageFolder follows it until the path is too long
    assert len(torchvision.datasets.ImageFolder(data / "train")) > 4  # what torchvision alone makes of it
    with pytest.raises(common.UserError) as e:
        common.load_data("folder", data, "test")
    assert str(e.value) == (f"{data / 'train' / 'c0' / 'loop'} is {data / 'train' / 'c0'} again (through a symbolic "
                            f"link), so its images would be counted twice: remove the link")


def test_a_linked_copy_of_a_class_folder_is_refused(tmp_path):
    data = write_folder(tmp_path / "data", classes=2, n_train=2, n_val=1, size=8)
    os.symlink(data / "val" / "c0", data / "val" / "c1" / "more")  # the val images of c0, again as c1's
    with pytest.raises(common.UserError, match=r"val/c1/more is .*val/c0 again \(through a symbolic link\)"):
        common.load_data("folder", data, "test")
    (data / "val" / "c1" / "more").unlink()
    elsewhere = write_folder(tmp_path / "elsewhere", classes=1, n_train=1, n_val=1, size=8)
    os.symlink(elsewhere / "val" / "c0", data / "val" / "c1" / "more")  # a link to images outside the set: once
    assert len(common.load_data("folder", data, "test").eval) == 3


def start(monkeypatch, argv):
    """loop.start_run of `byol.py argv`, parsed from the command line as the script does."""
    monkeypatch.setattr(sys, "argv", [str(common.Path(byol.__file__)), *map(str, argv)])
    return loop.start_run(byol.parse_args())


def test_every_run_says_how_many_images_each_split_holds(cifar_dir, tmp_path, no_md5, capsys, monkeypatch):
    start(monkeypatch, tiny_argv(cifar_dir, tmp_path / "a", "--device", "cpu"))
    assert "# images: 50 to pre-train on, 50 labelled in the k-NN bank, 20 to evaluate on (test)\n" in \
        capsys.readouterr().out
    start(monkeypatch, tiny_argv(cifar_dir, tmp_path / "b", "--eval-split", "val", "--device", "cpu"))
    assert "# images: 10 to pre-train on, 10 labelled in the k-NN bank, 40 to evaluate on (val)\n" in \
        capsys.readouterr().out


# --- 18.12: a full run on the CPU is announced, with the smoke run to try first ----------------------------------
def test_a_full_run_on_the_cpu_says_what_it_will_do_and_how_to_smoke_test(cifar_dir, tmp_path, no_md5, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    start(monkeypatch, [*tiny_argv(cifar_dir, tmp_path / "run"), "--accum-steps", "2", "--tau-base=0.9"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: no GPU found: training on the CPU: 2 epochs x 5 steps "
                                                   "of 10 images (resnet18); the progress bar shows the time per "
                                                   "step (s/it) after the first step, and the run takes 10 times that")
    command = shlex.split(lines[0].split("a smoke run checks the whole path first: ")[1])
    assert command[:2] == ["python", "byol.py"]
    smoke = byol.parse_args(command[2:])  # the user's other flags kept, a run folder of its own
    assert (smoke.subset, smoke.epochs, smoke.batch_size, smoke.accum_steps) == (512, 2, 128, 1)
    assert (smoke.out_dir, smoke.tau_base, smoke.hidden_dim, smoke.data_dir) == (None, 0.9, 32, str(cifar_dir))


def test_a_smoke_run_on_the_cpu_is_not_warned_about(cifar_dir, tmp_path, no_md5, capsys, monkeypatch):
    start(monkeypatch, tiny_argv(cifar_dir, tmp_path / "run", "--device", "cpu", "--subset", "40"))
    assert capsys.readouterr().err == ""


# --- 18.4: the linear probe's last update is checked too ---------------------------------------------------------
PROBE = ["--random-init", "--dataset", "cifar10", "--precompute", "--epochs", "1", "--subset", "20",
         "--workers", "0", "--knn-k", "5"]


def test_a_probe_diverging_in_its_only_step_writes_no_result(cifar_dir, tmp_path, capsys, no_md5, monkeypatch):
    # one step per epoch: its epoch's mean loss is its first loss, before the update; the trained probe's is not.
    # The features are the first 512 pixel values (a ResNet's forward passes would only add time).
    monkeypatch.setattr(common, "encode", lambda encoder, x, device: x.flatten(1)[:, :512].float())
    argv = [*PROBE, "--data-dir", cifar_dir, "--batch-size", "20", "--out", tmp_path / "r.json"]
    lines = check_refused(run_main("linear_eval", [*argv, "--lr", "1e30"], capsys),
                          "the linear probe diverged (loss ")
    assert "on the last batch after training, " in lines[-1]
    assert lines[-1].endswith("at its first step): lower --lr (1e+30); no result was written")
    assert list(tmp_path.iterdir()) == []
    assert run_main("linear_eval", argv, capsys)[0] == 0 and (tmp_path / "r.json").exists()  # a sane LR: written


def test_a_probe_on_non_finite_features_says_so(cifar_dir, tmp_path, capsys, no_md5, monkeypatch):
    monkeypatch.setattr(common, "encode", lambda encoder, x, device: torch.full((len(x), 512), float("nan")))
    check_refused(run_main("linear_eval", [*PROBE, "--data-dir", cifar_dir, "--out", tmp_path / "r.json"], capsys),
                  "the linear probe's loss is nan at its first step, before any update: the encoder's features are "
                  "not finite; no result was written")
    assert list(tmp_path.iterdir()) == []


# --- 18.8: out of memory while building the model; non-finite inputs of every loss --------------------------------
@pytest.mark.parametrize("script,flags", [("byol", ["--hidden-dim", 10**12]), ("sfrik", ["--expander", "1000000000000-8"])])
def test_out_of_memory_while_building_the_model_is_one_line(script, flags, tmp_path, capsys):
    # a real allocation of 2 PB, more than any address space: the CPU allocator refuses it at once
    check_refused(run_main(script, [*flags, "--data-dir", tmp_path, "--out-dir", tmp_path / "run"], capsys),
                  "out of memory building the model or moving it and the images to the device: lower the heads' "
                  "widths (--hidden-dim, --proj-dim, --expander) or --arch")
    assert not (tmp_path / "run").exists()


def test_singular_value_loss_is_nan_on_non_finite_input_and_unchanged_otherwise():
    torch.manual_seed(0)
    z = torch.randn(4, 6, 8)
    values = []
    for loss in (lambda x: -torch.linalg.svdvals(torch.nn.functional.normalize(x, dim=-1)).mean(),  # before
                 msbreg.singular_value_loss):
        x = z.clone().requires_grad_()
        value = loss(x)
        value.backward()
        values.append((value, x.grad))
    assert torch.equal(values[0][0], values[1][0]) and torch.equal(values[0][1], values[1][1])  # bit-identical
    z[2, 3, 1] = float("inf")
    assert msbreg.singular_value_loss(z).isnan()  # the SVD would raise


def poisoned(model):
    """A diverged network: the last layer of the projector (SFRIK's expander) NaN, so every embedding is. The encoder
    stays finite and frozen: NaN arithmetic in the convolutions (forward and backward) is slow on the CPU."""
    with torch.no_grad():
        model.projector[-1].weight.fill_(float("nan"))
    model.encoder.requires_grad_(False)
    return model


def methods():
    """(name, model, loss_fn(model, x1, x2)) as each method's train() calls loop.pretrain."""
    uni, mhe = byol_uniformity.parse_args([]), byol_mhe.parse_args([])
    legendre = byol_uniformity.parse_args(["--uniformity", "legendre"])
    tiny = lambda: byol.BYOL(TinyEncoder(16), 16, 32, 8)  # noqa: E731
    return [("byol", tiny(), byol.loss_terms),
            ("byol_uniformity", tiny(), lambda m, a, b: byol.loss_terms(m, a, b, byol_uniformity.uniformity_term(uni))),
            ("byol_uniformity legendre", tiny(),
             lambda m, a, b: byol.loss_terms(m, a, b, byol_uniformity.uniformity_term(legendre))),
            ("byol_mhe", tiny(), lambda m, a, b: byol.loss_terms(m, a, b, byol_mhe.mhe_term(mhe))),
            ("simclr", simclr.SimCLR(TinyEncoder(16), 16, 8), lambda m, a, b: (simclr.nt_xent(*m(a, b), 0.5), {})),
            ("sfrik", sfrik.SFRIK(TinyEncoder(16), 16, (32, 8)),
             sfrik.loss_terms(sfrik.parse_args(["--expander", "32-8"]))),
            ("msbreg", msbreg.MSBReg(TinyEncoder(16), 16, 32, 8),
             lambda m, a, b: msbreg.loss_terms(m, (a, b, b, a), 1.0, 1.0))]


def test_every_loss_is_nan_on_a_diverged_network_for_the_runs_check_to_report():
    # no method raises on non-finite weights (msbreg's SVD did): the loss is NaN, which run.check_finite reports
    x1, x2 = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    for name, model, loss_fn in methods():
        loss, _ = loss_fn(poisoned(model), x1, x2)
        loss.backward()
        common.LARS(model.parameters(), lr=0.1).step()
        assert loss.isnan(), name


def test_a_diverging_msbreg_run_is_one_line_without_saving(cifar_dir, tmp_path, no_md5, capsys):
    args = msbreg.parse_args(tiny_argv(cifar_dir, tmp_path / "run", "--epochs", "1", "--log-every", "1",
                                       "--base-lr", "1e30"))
    torch.manual_seed(0)
    model = msbreg.MSBReg(TinyEncoder(16), 16, 32, 8)
    with pytest.raises(SystemExit) as exit_:
        common.cli(lambda: msbreg.train(args, model))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().endswith(f"error: non-finite loss (nan) at step 3; stopped without saving: no checkpoint was "
                                f"written yet ({tmp_path / 'run'} holds no last.pt)")   # step 1's LR is 0 (warm-up)
    assert not (tmp_path / "run" / "last.pt").exists()


# --- 18.10: a regulariser that would do nothing, a flag that would be ignored -------------------------------------
@pytest.mark.parametrize("script,flags", [("sfrik", ["--legendre-weights", "0,0,0"]),
                                          ("byol_uniformity", ["--uniformity", "legendre", "--legendre-weights", "0"])])
def test_all_zero_legendre_weights_are_refused(script, flags, tmp_path, capsys):
    check_refused(run_main(script, [*flags, "--data-dir", tmp_path, "--out-dir", tmp_path / "run"], capsys),
                  "every b_l is 0, so the kernel and the MMD are 0 and the regulariser does nothing")
    assert not (tmp_path / "run").exists()
    assert sfrik.parse_args(["--legendre-weights", "0,0,1"]).legendre_weights == (0.0, 0.0, 1.0)  # one is enough


def test_unif_t_with_the_legendre_kernel_is_refused(tmp_path, capsys):
    check_refused(run_main("byol_uniformity", ["--uniformity", "legendre", "--unif-t", "3", "--data-dir", tmp_path,
                                               "--out-dir", tmp_path / "run"], capsys),
                  "--unif-t is the t of Eq. 2's Gaussian potential: --uniformity legendre has none")
    assert byol_uniformity.parse_args(["--unif-t", "3"]).unif_t == 3.0                 # Eq. 2's t
    assert byol_uniformity.parse_args(["--uniformity", "legendre"]).unif_t == 2.0      # the default, unused


# --- 18.14: --help as the command line reads it; commands that paste into a shell; what to download ---------------
SCRIPTS = [byol, byol_uniformity, byol_mhe, simclr, sfrik, msbreg, linear_eval]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_help_shows_what_each_flag_takes(script):
    text = script.build_parser().format_help()
    assert "(default: True)" not in text and "(default: False)" not in text   # a switch has no default to show
    assert "(default: (" not in text and "=(" not in text                     # nor a tuple, in the flags or presets
    if script is sfrik:
        assert "--expander W1-W2-..." in text and "expander=8192,8192,8192" in text
        assert "--legendre-weights B1,B2,..." in text and "(default: 1,40,40)" in text
        assert sfrik.parse_args(["--expander", "8192,8192,8192"]).expander == (8192,) * 3   # as the presets read


def test_linear_eval_examples_paste_into_a_shell():
    commands = [line.strip() for line in linear_eval.__doc__.splitlines() if line.strip().startswith("python ")]
    assert len(commands) == 3
    for command in commands:
        assert not set("<>|;&") & set(command.split("#")[0]), command   # no redirection in a placeholder


@pytest.mark.parametrize("dataset,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                            ("stl10", "stl10_binary")])
def test_a_failed_download_says_what_to_fetch_and_where_to_put_it(dataset, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")   # no network: the download fails at once
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    url = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "stl10": torchvision.datasets.STL10}[dataset].url
    with pytest.raises(common.UserError) as e:
        common.load_data(dataset, tmp_path / "data", "test")
    assert str(e.value).startswith(f"cannot load {dataset} from {tmp_path / 'data'}: ")
    assert str(e.value).endswith(f"; without a network, download {url} and unpack it so that "
                                 f"{tmp_path / 'data' / folder}/ exists")


# --- 19.4: --no-zero-init-residual, the first author's network ----------------------------------------------------
def last_batchnorms(encoder):
    """The last BatchNorm of each residual block (bn2 of a BasicBlock, bn3 of a Bottleneck)."""
    return [getattr(block, "bn3", None) or block.bn2 for block in common.residual_blocks(encoder).values()]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_residual_batchnorm_starts_at_zero_unless_the_flag_says_one(arch):
    default = byol.parse_args(["--arch", arch])
    author = byol.parse_args(["--arch", arch, "--no-zero-init-residual"])
    assert default.zero_init_residual is True and author.zero_init_residual is False   # args.json holds it
    states = []
    for args, scale in ((default, 0.0), (author, 1.0)):
        torch.manual_seed(0)
        encoder, _ = common.encoder_for(args)
        blocks = last_batchnorms(encoder)
        assert len(blocks) == {"resnet18": 8, "resnet50": 16}[arch]
        assert all(torch.equal(bn.weight, torch.full_like(bn.weight, scale)) for bn in blocks)
        zeroed = {name for name, m in encoder.named_modules() if m in blocks}
        states.append({k: v for k, v in encoder.state_dict().items() if k.rsplit(".", 1)[0] not in zeroed})
    # the flag changes those scales only and draws no random number: every other tensor is the default's
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_checkpoint_from_before_the_flag_rebuilds_the_same_encoder(tmp_path):
    args = vars(byol.parse_args(["--arch", "resnet18"]))
    del args["zero_init_residual"]  # an args.json / checkpoint written before the flag
    torch.manual_seed(0)
    encoder, dim = common.encoder_for(args)
    assert all(bn.weight.eq(0).all() for bn in last_batchnorms(encoder))   # what it was trained from
    ckpt = {"args": args, "model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}}
    loaded, _ = common.encoder_from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), encoder.state_dict().values()))


def test_linear_eval_random_init_takes_the_flag_and_a_checkpoint_refuses_it(tmp_path, capsys):
    parser = linear_eval.build_parser()
    for flags, scale in (([], 0.0), (["--no-zero-init-residual"], 1.0)):
        args = parser.parse_args(["--random-init", "--dataset", "cifar10", *flags])
        encoder, _, trained = linear_eval.frozen_encoder(args)
        assert trained["zero_init_residual"] is (scale == 0.0)
        assert all(bn.weight.eq(scale).all() for bn in last_batchnorms(encoder))
    check_refused(run_main("linear_eval", ["--checkpoint", tmp_path, "--no-zero-init-residual"], capsys),
                  "--no-zero-init-residual cannot be given with --checkpoint (only with --random-init)")


def test_results_keep_the_authors_network_out_of_the_papers_row(tmp_path, capsys):
    write_run(tmp_path, "byol-0", "byol", [], 0, evals=[{"top1": 89.0}])
    old = write_run(tmp_path, "byol-old", "byol", [], 1, evals=[{"top1": 91.0}])
    saved = json.loads((old / "args.json").read_text())
    del saved["zero_init_residual"]  # a run from before the flag: trained with the default
    (old / "args.json").write_text(json.dumps(saved))
    write_run(tmp_path, "byol-author", "byol", ["--no-zero-init-residual"], 2, evals=[{"top1": 10.0}])
    assert results.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 90.00 ± 1.41 |" in table_line(section(out, "## Table 5"), "no MHE (BYOL)")   # seeds 0 and 1 only
    assert "--no-zero-init-residual" in section(out, "## Other runs")
