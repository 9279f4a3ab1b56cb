"""The batched augmentation against torchvision: each operation equals torchvision.transforms.v2.functional on single
images given the same parameters, and the per-sample parameters follow the per-image pipeline's distributions."""
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

import common
from support import batched_views

BICUBIC = T.InterpolationMode.BICUBIC


def images(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a = torch.sort(torch.as_tensor(a, dtype=torch.float64))[0]
    b = torch.sort(torch.as_tensor(b, dtype=torch.float64))[0]
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


# --- each operation equals torchvision's functional op given the same parameters -----------------------------------
@pytest.mark.parametrize("size,out", [(32, 32), (96, 64), (40, 224)])   # CIFAR (upsampling), STL-10 (down), mixed
def test_resized_crop_and_flip_equal_torchvision(size, out):
    x = images(5, size).float() / 255
    g = torch.Generator().manual_seed(1)
    top, left, h, w = batched_views.sample_crops(5, size, size, g)
    flip = torch.tensor([True, False, True, False, True])
    batched = batched_views.resized_crop(x, top, left, h, w, out, flip=flip)
    for k in range(5):
        ref = TF.resized_crop(x[k], int(top[k]), int(left[k]), int(h[k]), int(w[k]), [out, out], BICUBIC,
                              antialias=True).clamp(0, 1)
        if flip[k]:
            ref = TF.horizontal_flip(ref)
        assert torch.allclose(batched[k], ref, atol=2e-5), (k, (batched[k] - ref).abs().max())


def test_resized_crop_of_the_whole_image_is_the_identity():
    x = images(2, 32).float() / 255
    full = torch.zeros(2), torch.zeros(2), torch.full((2,), 32.0), torch.full((2,), 32.0)
    assert torch.allclose(batched_views.resized_crop(x, *full, 32), x, atol=1e-6)


@pytest.mark.parametrize("op,ref,factor", [
    (batched_views.adjust_brightness, TF.adjust_brightness, 1.37),
    (batched_views.adjust_contrast, TF.adjust_contrast, 0.63),
    (batched_views.adjust_saturation, TF.adjust_saturation, 1.18),
    (batched_views.adjust_hue, TF.adjust_hue, -0.083),
    (batched_views.adjust_hue, TF.adjust_hue, 0.1),
])
def test_colour_ops_equal_torchvision(op, ref, factor):
    x = images(4).float() / 255
    x[0] = 0.5  # a flat grey image: hue and saturation must leave it alone
    out = op(x, torch.full((4,), factor))
    for k in range(4):
        assert torch.allclose(out[k], ref(x[k], factor), atol=1e-5), (k, (out[k] - ref(x[k], factor)).abs().max())


def test_colour_jitter_applies_each_images_own_order_and_factors():
    x = images(5).float() / 255
    factors = torch.tensor([[1.3, 0.7, 1.1, 0.05], [0.8, 1.2, 0.9, -0.07], [1.0, 1.4, 0.8, 0.1],
                            [0.6, 0.9, 1.2, -0.1], [1.1, 1.1, 1.1, 0.02]])
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2], [0, 1, 2, 3]])
    apply = torch.tensor([True, True, True, True, False])
    out = batched_views.colour_jitter(x, factors, order, apply)
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in range(5):
        y = x[k]
        if apply[k]:
            for op in order[k].tolist():
                y = refs[op](y, factors[k, op].item())
        assert torch.allclose(out[k], y, atol=1e-5), k


def test_grayscale_blur_solarize_equal_torchvision():
    x = images(3).float() / 255
    assert torch.allclose(batched_views.grayscale(x)[1], TF.rgb_to_grayscale(x[1], num_output_channels=1), atol=1e-6)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    blurred = batched_views.gaussian_blur(x, sigma, 9)
    for k in range(3):
        ref = TF.gaussian_blur(x[k], [9, 9], [sigma[k].item(), sigma[k].item()])
        assert torch.allclose(blurred[k], ref, atol=1e-5), k
    assert torch.equal(batched_views.solarize(x), TF.solarize(x, 0.5))


def test_batched_view_shape_range_and_reproducibility():
    imgs = images(16, 96)
    a = batched_views.batched_view(imgs, "stl10", 64, 1.0, 0.0, g=torch.Generator().manual_seed(3))
    b = batched_views.batched_view(imgs, "stl10", 64, 1.0, 0.0, g=torch.Generator().manual_seed(3))
    assert a.shape == (16, 3, 64, 64) and torch.equal(a, b)
    info = common.DATASETS["stl10"]
    lo = min((0 - m) / s for m, s in zip(info.mean, info.std))
    hi = max((1 - m) / s for m, s in zip(info.mean, info.std))
    assert a.min() >= lo - 1e-5 and a.max() <= hi + 1e-5
    # every sample gets its own parameters: no two crops of the batch are the same
    assert len({tuple(v.flatten()[:20].tolist()) for v in a}) == 16


def test_blur_and_solarize_only_where_the_dataset_has_them():
    imgs = images(64)
    p = batched_views.view_params(64, 32, 32, blur_p=1.0, solarize_p=1.0, g=torch.Generator().manual_seed(4))
    cifar = batched_views.apply_view(imgs, p, "cifar10", 32)
    no_blur = dict(p, blur=torch.zeros(64, dtype=torch.bool), solarize=torch.zeros(64, dtype=torch.bool))
    assert torch.equal(cifar, batched_views.apply_view(imgs, no_blur, "cifar10", 32))           # B.5.2: off on CIFAR
    folder_on, folder_off = batched_views.apply_view(imgs, p, "folder", 32), batched_views.apply_view(imgs, no_blur, "folder", 32)
    assert not torch.allclose(folder_on, folder_off)


# --- the per-sample parameters follow the per-image pipeline's distributions -------------------------------------
N = 20000


@pytest.mark.parametrize("height,width", [(32, 32), (96, 96), (30, 80)])
def test_crop_parameters_match_torchvision_distribution(height, width):
    top, left, h, w = (v.double() for v in batched_views.sample_crops(N, height, width, torch.Generator().manual_seed(5)))
    assert ((h >= 1) & (h <= height) & (w >= 1) & (w <= width) & (top >= 0) & (top + h <= height) & (left >= 0)
            & (left + w <= width)).all()
    torch.manual_seed(6)
    rrc = T.RandomResizedCrop(32, scale=common.CROP_SCALE, ratio=common.CROP_RATIO)
    img = torch.zeros(3, height, width)
    ref = torch.tensor([rrc.get_params(img, rrc.scale, rrc.ratio) for _ in range(N)], dtype=torch.float64)
    ti, tj, th, tw = ref.unbind(1)
    assert ks_statistic(h * w / (height * width), th * tw / (height * width)) < 0.025   # area
    assert ks_statistic(torch.log(w / h), torch.log(tw / th)) < 0.025                    # aspect
    assert ks_statistic(top, ti) < 0.025 and ks_statistic(left, tj) < 0.025              # position


def test_crop_fallback_equals_torchvision():
    # an image so elongated that no try fits: both fall back to the same centred crop
    top, left, h, w = batched_views.sample_crops(50, 4, 200, torch.Generator().manual_seed(7))
    rrc = T.RandomResizedCrop(32, scale=(0.9, 1.0), ratio=common.CROP_RATIO)
    i, j, th, tw = rrc.get_params(torch.zeros(3, 4, 200), (0.99, 1.0), rrc.ratio)
    fallback = (h == th) & (w == tw) & (top == i) & (left == j)
    assert fallback.any()


def test_view_parameter_rates_and_ranges():
    p = batched_views.view_params(N, 32, 32, blur_p=0.1, solarize_p=0.2, g=torch.Generator().manual_seed(8))
    rate = lambda mask: mask.float().mean().item()  # noqa: E731
    assert rate(p["flip"]) == pytest.approx(0.5, abs=0.015)
    assert rate(p["jitter"]) == pytest.approx(common.JITTER_P, abs=0.015)
    assert rate(p["gray"]) == pytest.approx(common.GRAY_P, abs=0.015)
    assert rate(p["blur"]) == pytest.approx(0.1, abs=0.015)
    assert rate(p["solarize"]) == pytest.approx(0.2, abs=0.015)
    f = p["factors"]
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert f[:, k].min() >= lo and f[:, k].max() <= hi
        assert ks_statistic(f[:, k], torch.empty(N).uniform_(lo, hi)) < 0.025         # uniform factors
    assert ks_statistic(p["sigma"], torch.empty(N).uniform_(0.1, 2.0)) < 0.025
    # the order of the four operations: every permutation about equally often (1/24)
    codes = (p["order"] * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[torch.unique(codes)]
    assert len(counts) == 24 and (counts.float() / N - 1 / 24).abs().max() < 0.01
    assert sorted(p["order"][0].tolist()) == [0, 1, 2, 3]


def test_colour_jitter_whole_batch_and_per_op_paths_agree():
    x = images(32).float() / 255
    p = batched_views.view_params(32, 32, 32, 0.0, 0.0, torch.Generator().manual_seed(9))
    a = batched_views.colour_jitter(x, p["factors"], p["order"], p["jitter"], whole_batch=True)
    b = batched_views.colour_jitter(x, p["factors"], p["order"], p["jitter"], whole_batch=False)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, x)


def test_uint8_images_through_subsets_match_torchvision(cifar_dir, no_md5):
    import numpy as np
    data = common.load_data("cifar10", cifar_dir, "val", subset=3)   # Subset(Subset(train, train_idx), range(3))
    u8 = batched_views.uint8_images(data.pretrain)
    assert u8.shape == (3, 3, 32, 32) and u8.dtype == torch.uint8
    for k in range(3):
        assert torch.equal(u8[k], torch.from_numpy(np.array(data.pretrain[k][0])).permute(2, 0, 1))


@pytest.mark.parametrize("dataset,native,size", [("cifar10", 32, 32), ("stl10", 96, 64)])
def test_eval_view_equals_torchvision_eval_transform(dataset, native, size):
    u8 = images(3, native)
    x = u8.float() / 255
    ref = x
    if native != size:
        ref = TF.resize(ref, [size, size], BICUBIC, antialias=True).clamp(0, 1)
    ref = TF.center_crop(ref, [round(size * 7 / 8)] * 2)
    ref = TF.resize(ref, [size, size], BICUBIC, antialias=True).clamp(0, 1)
    info = common.DATASETS[dataset]
    ref = TF.normalize(ref, info.mean, info.std)
    assert torch.allclose(batched_views.eval_view(u8, dataset, size), ref, atol=1e-4)


def test_device_batches_eval_in_order_and_probe_reshuffled(cifar_dir, no_md5):
    data = common.load_data("cifar10", cifar_dir, "test")
    evals = batched_views.DeviceBatches(data.bank, "cifar10", 32, 16, torch.device("cpu"))
    assert len(evals) == 4
    labels = torch.cat([y for _, y in evals])
    assert torch.equal(labels, torch.as_tensor(data.bank.targets))
    first = torch.cat([x for x, _ in evals])
    assert torch.equal(first, torch.cat([x for x, _ in evals]))                          # deterministic
    probe = batched_views.DeviceBatches(data.bank, "cifar10", 32, 16, torch.device("cpu"), seed=0)
    pass1, pass2 = [torch.cat([y for _, y in probe]) for _ in range(2)]
    assert sorted(pass1.tolist()) == sorted(labels.tolist()) and not torch.equal(pass1, pass2)
    x, _ = next(iter(probe))
    assert x.shape == (16, 3, 32, 32)
