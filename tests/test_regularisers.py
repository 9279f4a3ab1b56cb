"""Eq. 2, A.1 (uniformity, alignment), Eq. 5, A.3, 7 (hyperspherical energy, MHE), and Eq. 4 / Eq. 7 runs that
reduce exactly to BYOL at weight 0."""
import itertools
import math

import pytest
import torch

import byol
import byol_mhe
import byol_uniformity
import common
import loop
from support import batched_views
from conftest import write_folder
from test_training import tiny_argv, tiny_byol

POWERS = common.MHE_POWERS


def naive_energy(weight, power):
    """Eq. 5 / Eq. A.3 written out: a double loop over neurons, divided by N (N - 1) (Eq. 7)."""
    w = [v / v.norm() for v in weight.detach().double().flatten(1)]
    n, s, total = len(w), int(power[-1]), 0.0
    for i, j in itertools.permutations(range(n), 2):
        cos = max(-1.0, min(1.0, float(w[i] @ w[j])))
        d = math.acos(cos) if power.startswith("a") else float((w[i] - w[j]).norm())
        total += math.log(1 / d) if s == 0 else d ** -s
    return total / (n * (n - 1))


# --- hyperspherical energy ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("shape", [(7, 5), (6, 3, 3, 3)])  # a linear weight, a conv weight
def test_energy_matches_naive_double_loop(power, shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    assert common.hyperspherical_energy(w, power).item() == pytest.approx(naive_energy(w, power), rel=1e-4)


@pytest.mark.parametrize("power", POWERS)
def test_energy_closed_forms(power):
    s, angular = int(power[-1]), power.startswith("a")
    kernel = (lambda d: math.log(1 / d)) if s == 0 else (lambda d: d ** -s)
    antipodal = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    expect = kernel(math.pi if angular else 2.0)          # distance 2, angle pi
    assert common.hyperspherical_energy(antipodal, power).item() == pytest.approx(expect, rel=2e-3)
    orthonormal = torch.eye(4)
    expect = kernel(math.pi / 2 if angular else math.sqrt(2))   # distance sqrt 2, angle pi/2
    assert common.hyperspherical_energy(orthonormal, power).item() == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("power", POWERS)
def test_energy_invariant_to_rescaling_each_neuron(power):
    torch.manual_seed(2)
    w = torch.randn(9, 4)
    scaled = w * (torch.rand(9, 1) * 5 + 0.1)
    assert common.hyperspherical_energy(scaled, power).item() == pytest.approx(
        common.hyperspherical_energy(w, power).item(), rel=1e-5)


@pytest.mark.parametrize("power", POWERS)
def test_gradient_step_lowers_energy(power):
    torch.manual_seed(3)
    w = torch.randn(10, 3, requires_grad=True)
    e0 = common.hyperspherical_energy(w, power)
    e0.backward()
    with torch.no_grad():
        w2 = w - 0.01 * w.grad / w.grad.norm()
    assert common.hyperspherical_energy(w2, power).item() < e0.item()


@pytest.mark.parametrize("power", POWERS)
def test_duplicated_and_opposite_neurons_stay_finite(power):
    w = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [-1.0, -2.0, -3.0], [0.5, -1.0, 0.2]], requires_grad=True)
    e = common.hyperspherical_energy(w, power)
    e.backward()
    assert torch.isfinite(e) and torch.isfinite(w.grad).all()


def test_energy_rejects_unknown_power():
    with pytest.raises(ValueError):
        common.hyperspherical_energy(torch.randn(3, 3), "3")


@pytest.mark.parametrize("power", POWERS)
def test_total_energy_batches_equal_shapes_exactly(power):
    torch.manual_seed(7)
    weights = [torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3), torch.randn(5, 6), torch.randn(8, 4, 3, 3)]
    one_by_one = sum(common.hyperspherical_energy(w, power) for w in weights)
    assert common.total_energy(weights, power).item() == pytest.approx(one_by_one.item(), rel=1e-5)


def test_mhe_regulariser_is_eq7_sum_over_layers():
    model = tiny_byol()
    parts = ("projector", "predictor")
    expect = sum(common.hyperspherical_energy(w, "a2") for p in parts for w in common.layer_weights(getattr(model, p)))
    assert len([w for p in parts for w in common.layer_weights(getattr(model, p))]) == 4  # 2 Linear each, no BN/bias
    assert byol_mhe.mhe_regulariser(model, parts, "a2").item() == pytest.approx(expect.item())


# --- uniformity and alignment -----------------------------------------------------------------------------------------
def test_uniformity_matches_literal_formula_and_is_permutation_invariant():
    torch.manual_seed(4)
    z = torch.randn(12, 5)
    zn = z / z.norm(dim=1, keepdim=True)
    pairs = [math.exp(-2 * float(((zn[i] - zn[j]) ** 2).sum())) for i, j in itertools.permutations(range(12), 2)]
    literal = math.log(sum(pairs) / len(pairs))
    assert common.uniformity_loss(z, t=2).item() == pytest.approx(literal, rel=1e-5)
    assert common.uniformity_loss(z[torch.randperm(12)]).item() == pytest.approx(literal, rel=1e-5)
    assert common.uniformity_loss(z * 7.0).item() == pytest.approx(literal, rel=1e-5)


def test_uniformity_lower_for_spread_than_clustered_points():
    torch.manual_seed(5)
    spread = torch.randn(64, 3)
    clustered = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(64, 3)
    assert common.uniformity_loss(spread) < common.uniformity_loss(clustered)


def test_alignment_matches_literal_formula():
    torch.manual_seed(6)
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    xn, yn = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    literal = sum(float((xn[i] - yn[i]).norm()) ** 2 for i in range(8)) / 8
    assert common.alignment_loss(x, y).item() == pytest.approx(literal, rel=1e-5)
    assert common.alignment_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)


# --- the variants reduce to BYOL ------------------------------------------------------------------------------------
def train_tiny(argv, module=None):
    """A few steps of byol.py, or of the variant `module` (byol_uniformity / byol_mhe) through byol.train."""
    if module is None:
        args, terms = byol.parse_args(argv), None
    else:
        args = byol.parse_args(argv, module.build_parser(), module.__name__)
        terms = (module.uniformity_term if module is byol_uniformity else module.mhe_term)(args)
    model = tiny_byol()
    assert byol.train(args, model, extra_terms=terms) == 0
    return model.state_dict()


def test_zero_weight_variants_equal_byol(cifar_dir, tmp_path, no_md5):
    reference = train_tiny(tiny_argv(cifar_dir, tmp_path / "byol", "--epochs", "1"))
    uni = train_tiny(tiny_argv(cifar_dir, tmp_path / "uni", "--epochs", "1", "--unif-weight", "0"), byol_uniformity)
    mhe = train_tiny(tiny_argv(cifar_dir, tmp_path / "mhe", "--epochs", "1", "--mhe-weight", "0",
                               "--mhe-on", "encoder,projector,predictor"), byol_mhe)
    for other in (uni, mhe):
        for k, v in reference.items():
            assert torch.equal(v, other[k]), k
    # a non-zero weight does change the result
    for module, flags in ((byol_uniformity, ["--unif-weight", "1"]), (byol_mhe, ["--mhe-weight", "10"])):
        changed = train_tiny(tiny_argv(cifar_dir, tmp_path / f"{module.__name__}-on", "--epochs", "1", *flags), module)
        assert not torch.equal(changed["projector.0.weight"], reference["projector.0.weight"])


def test_representation_analysis_on_the_device_agrees_with_the_per_image_path(cifar_dir, no_md5):
    """The analysis of in-memory datasets runs on the device (eval_view, batched_view) instead of PIL: same keys,
    the same MHE values, uniformity and stage energies within the float32-vs-8-bit difference of the two eval
    transforms, and the same views at every evaluation."""
    data = common.load_data("cifar10", cifar_dir, "test")
    images = torch.utils.data.Subset(data.eval, range(16))
    torch.manual_seed(0)
    model = byol.BYOL(*common.build_encoder("resnet18", "cifar"), 64, 32)
    for m in model.encoder.modules():  # undo zero_init_residual: every block changes its input
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    args = (model, images, "cifar10", 32, byol.VIEWS, "a2", torch.device("cpu"))
    pil = loop.representation_analysis(*args)
    batched = loop.representation_analysis(*args, on_device=True)
    assert loop.representation_analysis(*args, on_device=True) == batched
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]  # ResNet-18's 8 blocks (Fig. 4)
    assert set(batched) == set(pil) == {"eval_uniformity", "eval_alignment", "eval_mhe_encoder", "eval_mhe_projector",
                                        "eval_mhe_predictor", "eval_mmd_legendre",
                                        *(f"eval_energy_{b}" for b in blocks)}
    for part in ("encoder", "projector", "predictor"):
        assert batched[f"eval_mhe_{part}"] == pil[f"eval_mhe_{part}"]
    assert abs(batched["eval_uniformity"] - pil["eval_uniformity"]) <= 1e-3 * abs(pil["eval_uniformity"])
    assert abs(batched["eval_mmd_legendre"] - pil["eval_mmd_legendre"]) <= 1e-3 * pil["eval_mmd_legendre"]  # 7e-7
    for block in blocks:  # the near-parallel pooled features of a random network make 1/angle^2 sensitive to the
        key = f"eval_energy_{block}"  # last bits of the pixels
        assert abs(batched[key] - pil[key]) <= 0.04 * pil[key], key
    assert 0 < batched["eval_alignment"] < 4 and 0 < pil["eval_alignment"] < 4  # from different random views

    # Fig. 4, "the output of each ResNet block": each block's globally pooled output over the images, Eq. A.3
    pooled = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: pooled.__setitem__(n, o.mean(dim=(2, 3))))
             for n, m in model.encoder.named_modules() if n in blocks]
    with torch.no_grad():
        model.encoder.eval()(batched_views.eval_view(batched_views.uint8_images(images), "cifar10", 32))
    for h in hooks:
        h.remove()
    for block in blocks:
        expect = common.hyperspherical_energy(pooled[block], "a2").item()
        assert batched[f"eval_energy_{block}"] == pytest.approx(expect, rel=1e-4), block


def test_analysis_images_are_fixed_and_spread_over_a_class_sorted_folder(tmp_path):
    """ImageFolder sorts a split by class: the analysis draws its images once with a fixed seed over the whole
    split (not its first n), the same at every evaluation and in every run."""
    data = common.load_data("folder", write_folder(tmp_path, classes=4, n_train=2, n_val=5, size=8), "test")
    first = batched_views.labels_of(torch.utils.data.Subset(data.eval, range(8)))
    assert first.unique().tolist() == [0, 1]  # what the first 8 of the split would have covered
    chosen = common.analysis_images(data.eval, 8)
    torch.manual_seed(123)  # the global RNG plays no part
    assert len(chosen) == 8 and chosen.indices == common.analysis_images(data.eval, 8).indices
    assert len(set(chosen.indices)) == 8 and chosen.indices != list(range(8))
    assert len(batched_views.labels_of(chosen).unique()) >= 3
    assert len(common.analysis_images(data.eval, 100)) == 20  # at most the whole split


def test_uniformity_term_on_projector_or_encoder():
    """--unif-on: Eq. 2 averaged over the two views' online projections z (default) or encoder features h."""
    torch.manual_seed(8)
    out = {k: torch.randn(6, 5) for k in ("h1", "h2", "z1", "z2")}
    for on, (a, b) in (("projector", ("z1", "z2")), ("encoder", ("h1", "h2"))):
        argv = ["--unif-on", on, "--unif-weight", "0.3"] if on == "encoder" else ["--unif-weight", "0.3"]
        args = byol_uniformity.build_parser().parse_args(argv)
        (lam, value), = byol_uniformity.uniformity_term(args)(None, out).values()
        expect = (common.uniformity_loss(out[a]) + common.uniformity_loss(out[b])) / 2
        assert lam == 0.3 and value.item() == pytest.approx(expect.item(), rel=1e-6)
    model = tiny_byol()
    out = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert out["h1"].shape == (4, 16) and out["z1"].shape == (4, 8)  # BYOL.forward gives both
