"""Augmentations of Appendix B.5: shapes, ranges, BYOL's asymmetric views, the CIFAR/STL-10 omissions."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import byol
import common


def ops_of(compose):
    """Flatten a Compose (and RandomApply) into [(op, probability)]."""
    out = []
    for t in compose.transforms:
        if isinstance(t, T.RandomApply):
            out += [(inner, t.p) for inner in t.transforms]
        else:
            out.append((t, getattr(t, "p", 1.0)))
    return out


def find(ops, cls):
    return [(t, p) for t, p in ops if isinstance(t, cls)]


def random_image(size, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("dataset,size", [("cifar10", 32), ("stl10", 64), ("imagenet", 224)])
def test_views_shape_and_range(dataset, size):
    info = common.DATASETS[dataset]
    lo = min((0 - m) / s for m, s in zip(info.mean, info.std))
    hi = max((1 - m) / s for m, s in zip(info.mean, info.std))
    for blur_p, sol_p in byol.VIEWS:
        x = common.ssl_augmentation(dataset, size, blur_p, sol_p)(random_image(size + 8))
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.min() >= lo - 1e-4 and x.max() <= hi + 1e-4


def test_common_ops_and_parameters():
    ops = ops_of(common.ssl_augmentation("imagenet", 224, 1.0, 0.0))
    (crop, _), = find(ops, T.RandomResizedCrop)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == T.InterpolationMode.BICUBIC and crop.size == (224, 224)
    (flip, p_flip), = find(ops, T.RandomHorizontalFlip)
    assert p_flip == 0.5
    (jit, p_jit), = find(ops, T.ColorJitter)
    assert p_jit == 0.8
    assert jit.brightness == (0.6, 1.4) and jit.contrast == (0.6, 1.4) and jit.saturation == (0.8, 1.2)
    assert jit.hue == (-0.1, 0.1)
    (_, p_gray), = find(ops, T.RandomGrayscale)
    assert p_gray == 0.2
    (blur, _), = find(ops, T.GaussianBlur)
    assert blur.kernel_size == (23, 23) and blur.sigma == (0.1, 2.0)
    # order of Appendix B.5: crop, flip, jitter, grayscale, blur, (to tensor), solarise, normalise
    kinds = [type(t) for t, _ in ops]
    assert kinds.index(T.RandomResizedCrop) < kinds.index(T.RandomHorizontalFlip) < kinds.index(T.ColorJitter) \
        < kinds.index(T.RandomGrayscale) < kinds.index(T.GaussianBlur)


def test_byol_asymmetric_probabilities_on_imagenet():
    (b1, s1), (b2, s2) = byol.VIEWS
    assert (b1, s1, b2, s2) == (1.0, 0.0, 0.1, 0.2)
    v1 = ops_of(common.ssl_augmentation("imagenet", 224, b1, s1))
    v2 = ops_of(common.ssl_augmentation("imagenet", 224, b2, s2))
    assert [p for _, p in find(v1, T.GaussianBlur)] == [1.0] and not find(v1, T.RandomSolarize)
    assert [p for _, p in find(v2, T.GaussianBlur)] == [0.1]
    (sol, p_sol), = find(v2, T.RandomSolarize)
    assert p_sol == 0.2 and sol.threshold == 0.5


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "stl10"])
def test_blur_and_solarisation_off_for_cifar_and_stl(dataset):
    for blur_p, sol_p in byol.VIEWS:
        ops = ops_of(common.ssl_augmentation(dataset, common.DATASETS[dataset].image_size, blur_p, sol_p))
        assert not find(ops, T.GaussianBlur) and not find(ops, T.RandomSolarize)


def test_blur_kernel_scales_with_size():
    assert common.blur_kernel_size(224) == 23
    assert common.blur_kernel_size(112) % 2 == 1 and abs(common.blur_kernel_size(112) - 11.5) <= 1


def test_solarize_threshold_is_papers():
    x = torch.tensor([[[0.2, 0.49, 0.5, 0.9]]])
    y = T.RandomSolarize(threshold=0.5, p=1.0)(x)
    assert torch.allclose(y, torch.tensor([[[0.2, 0.49, 0.5, 0.1]]]))   # x >= 0.5 -> 1 - x


def test_eval_transforms():
    cifar = common.eval_transform("cifar10", 32)
    kinds = [type(t) for t in cifar.transforms]
    assert kinds[:3] == [T.Resize, T.CenterCrop, T.Resize] and cifar.transforms[1].size == (28, 28)
    assert cifar(random_image(32)).shape == (3, 32, 32)
    stl = common.eval_transform("stl10", 64)
    assert stl.transforms[1].size == (56, 56) and stl(random_image(96)).shape == (3, 64, 64)
    inet = common.eval_transform("imagenet", 224)
    assert inet.transforms[0].size == 256 and inet.transforms[1].size == (224, 224)


def test_views_are_a_pure_function_of_the_seed():
    views = (common.ssl_augmentation("cifar10", 32, 1.0, 0.0), common.ssl_augmentation("cifar10", 32, 0.1, 0.2))
    image = [(random_image(32), 0)]
    ds = common.Views(image, *views)
    a1, a2 = ds[(0, 123)]
    torch.rand(5)  # global RNG state must not matter
    b1, b2 = ds[(0, 123)]
    c1, _ = ds[(0, 124)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, c1)
    # M views: the first two are those of the two-view dataset (M = 2 changes nothing), the others new draws
    m1, m2, m3, m4 = common.Views(image, *views, *views)[(0, 123)]
    assert torch.equal(m1, a1) and torch.equal(m2, a2) and not torch.equal(m3, a1) and not torch.equal(m4, a2)
