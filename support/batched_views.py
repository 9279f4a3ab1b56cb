"""Appendix B.5 for a whole uint8 batch on its device: the views of every image of an in-memory dataset (CIFAR,
STL-10) made where it trains, every random parameter drawn per image from the same distributions as
common.ssl_augmentation, the readable torchvision reference (tests/test_batched_augment.py pins the two together).
Hand-written because torchvision.transforms.v2 applied to a batch draws one set of parameters for the whole batch
(pytorch/vision#8484). Images are floats in [0, 1] until the final normalisation."""
import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from common import (BLUR_SIGMA, CROP_RATIO, CROP_SCALE, DATASETS, GRAY_P, IN_MEMORY, JITTER, JITTER_P, Transformed,
                    blur_kernel_size, dataset_targets, eval_transform)
from support.errors import workers_ignore_signals


def _unwrap(ds):
    """The torchvision dataset inside any Subsets, and the indices into it (None: all of it)."""
    index = None
    while isinstance(ds, Subset):
        outer = torch.as_tensor(ds.indices, dtype=torch.long)
        index = outer if index is None else outer[index]
        ds = ds.dataset
    return ds, index


def uint8_images(ds):
    """The uint8 images (N, 3, H, W) of an in-memory torchvision dataset (CIFAR keeps (N, H, W, 3), STL-10
    (N, 3, H, W)), through any Subsets around it."""
    base, index = _unwrap(ds)
    x = torch.from_numpy(base.data)
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return (x if index is None else x[index]).contiguous()


def labels_of(ds):
    """The labels (N,) of a dataset, through any Subsets around it."""
    base, index = _unwrap(ds)
    y = torch.as_tensor(dataset_targets(base), dtype=torch.long)
    return y if index is None else y[index]


class DeviceViews:
    """The views of each micro-batch (one per entry of `views`), made by share_view (batched_view of this process's
    share) from the whole uint8 split held on the device: no DataLoader, no host-to-device copy per step. Same order
    as EpochBatches; each micro-batch's augmentations come from a generator seeded by (seed, epoch, position), so a
    resumed run sees the same views. Under torchrun every process draws the parameters of the whole global
    micro-batch and makes the views of its share only, so the views of an image do not depend on the number of
    processes."""

    def __init__(self, images, sampler, dataset, size, views):
        self.images, self.sampler, self.dataset, self.size, self.views = images, sampler, dataset, size, views

    def __iter__(self):
        dev, share = self.images.device, self.sampler.share
        for index, seeds in self.sampler.micro_batches(dev):
            g = torch.Generator(dev).manual_seed(int(seeds[0]))
            images = self.images[index[share]]
            yield tuple(share_view(images, len(index), share, self.dataset, self.size, *v, g=g) for v in self.views)


def sample_crops(n, height, width, g, device="cpu"):
    """torchvision's RandomResizedCrop.get_params for n images at once: up to 10 tries of area ~ U(scale) * H * W and
    log-aspect ~ U(log ratio); the first try that fits wins; if none fits, the central crop of clamped aspect.
    Returns (top, left, height, width), each (n,) float."""
    area = height * width * torch.empty(n, 10, device=device).uniform_(*CROP_SCALE, generator=g)
    aspect = torch.exp(torch.empty(n, 10, device=device).uniform_(*map(math.log, CROP_RATIO), generator=g))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    top = torch.floor(torch.rand(n, device=device, generator=g) * (height - h + 1))
    left = torch.floor(torch.rand(n, device=device, generator=g) * (width - w + 1))
    # fallback when no try fits: the whole image, cut to the nearest allowed aspect ratio, centred
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        fw, fh = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        fw, fh = round(height * CROP_RATIO[1]), height
    else:
        fw, fh = width, height
    ok = fits.any(dim=1)
    fallback = lambda value, default: torch.where(ok, value, torch.full_like(value, default))  # noqa: E731
    return (fallback(top, (height - fh) // 2), fallback(left, (width - fw) // 2), fallback(h, fh), fallback(w, fw))


def _cubic(x, a=-0.5):
    """Keys' cubic convolution kernel with a = -0.5, as PIL's and torch's antialiased bicubic resampling."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start, length, in_size, out_size):
    """(n, out_size, in_size) matrices M with (M @ signal) = the window [start, start + length) of each length-in_size
    signal resized to out_size samples by antialiased bicubic interpolation, as torch.nn.functional.interpolate(
    mode="bicubic", antialias=True) and PIL resize the cropped image: taps never leave the window."""
    scale = (length / out_size)[:, None, None]                                  # (n, 1, 1) input px per output px
    support = 2 * scale.clamp(min=1)                                            # 2 taps a side, wider to antialias
    centre = scale * (torch.arange(out_size, device=start.device)[None, :, None] + 0.5)     # (n, out, 1) in window
    x = torch.arange(in_size, device=start.device)[None, None, :] - start[:, None, None]    # (n, 1, in) in window
    lo = torch.floor(centre - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.floor(centre + support + 0.5), length[:, None, None])
    w = _cubic((x - centre + 0.5) / scale.clamp(min=1)) * ((x >= lo) & (x < hi))
    return w / w.sum(dim=-1, keepdim=True)


def resized_crop(images, top, left, height, width, size, flip=None):
    """Crop each image (n, C, H, W) to its window and resize it to size x size with bicubic antialiased resampling,
    mirrored left-right where `flip` (n,) is true: two batched matrix products, out = W_y @ image @ W_x^T."""
    wy = resize_weights(top, height, images.shape[-2], size)                   # (n, size, H)
    wx = resize_weights(left, width, images.shape[-1], size)                   # (n, size, W)
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    return torch.einsum("nyh,nchw,nxw->ncyx", wy, images, wx).clamp(0, 1)     # as uint8 images clip


def grayscale(x):
    """ITU-R 601 luma 0.2989 r + 0.587 g + 0.114 b (Appendix B.5), (n, 1, H, W)."""
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(x, y, factor):
    return (factor[:, None, None, None] * x + (1 - factor[:, None, None, None]) * y).clamp(0, 1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return _blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), factor)


def adjust_hue(x, shift):
    """Rotate the hue of each image by shift (n,) turns, through HSV as torchvision does."""
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    chroma = maxc - minc
    flat = chroma == 0
    sat = chroma / torch.where(flat, torch.ones_like(maxc), maxc)
    c = torch.where(flat, torch.ones_like(chroma), chroma)
    hue = torch.where(maxc == r, (g - b) / c, torch.where(maxc == g, 2 + (b - r) / c, 4 + (r - g) / c))
    hue = torch.where(flat, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6 + 1 + shift[:, None, None], 1.0)               # shifted hue in [0, 1)
    # HSV -> RGB
    h6 = hue * 6
    sector = torch.floor(h6).long() % 6
    f = h6 - torch.floor(h6)
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    table = torch.stack([torch.stack(rgb) for rgb in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])  # (6, 3, n, H, W)
    index = sector[None, None].expand(1, 3, *sector.shape)
    return table.gather(0, index)[0].permute(1, 0, 2, 3)


COLOUR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's ColorJitter order


def colour_jitter(x, factors, order, apply, whole_batch=None):
    """ColorJitter per sample: factors (n, 4) for brightness, contrast, saturation, hue; order (n, 4) a permutation
    of the four operations for each image; apply (n,) whether the image is jittered at all.

    whole_batch (default: on CUDA) runs every operation on the whole batch and keeps each image's own with
    torch.where, which never waits for the host; otherwise each operation runs only on the images that need it,
    4x less arithmetic for the CPU. Both give the same images."""
    whole_batch = x.is_cuda if whole_batch is None else whole_batch
    for position in range(4):
        chosen = [apply & (order[:, position] == k) for k in range(len(COLOUR_OPS))]
        if whole_batch:
            x = sum(torch.where(c[:, None, None, None], op(x, factors[:, k]), 0.0)
                    for k, (op, c) in enumerate(zip(COLOUR_OPS, chosen))) + torch.where(
                        (~apply)[:, None, None, None], x, 0.0)
        else:
            for k, (op, c) in enumerate(zip(COLOUR_OPS, chosen)):
                rows = c.nonzero().flatten()
                if len(rows):
                    x = x.index_copy(0, rows, op(x[rows], factors[rows, k]))
    return x


def gaussian_blur(x, sigma, kernel_size):
    """Per-image Gaussian blur, reflect padding, as torchvision's gaussian_blur: sigma (n,)."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)           # (n*C, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)                          # vertical pass
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)                          # horizontal pass
    return y.reshape(n, c, h, w)


def solarize(x):
    return torch.where(x >= 0.5, 1 - x, x)  # Appendix B.5: x -> 1 - x where x >= 0.5


@functools.lru_cache
def _constants(device, values):
    """A small constant tensor, copied to `device` once: a copy from the host on every step would make the GPU
    stream wait for the host each time."""
    return torch.tensor(values, device=device)


def view_params(n, height, width, blur_p, solarize_p, g, device="cpu", jitter=JITTER, jitter_p=JITTER_P):
    """Every random parameter of one view (Appendix B.5) for each of n images of height x width, from generator g."""
    u = lambda *shape: torch.rand(*shape, device=device, generator=g)  # noqa: E731
    b, c, s, h = jitter["brightness"], jitter["contrast"], jitter["saturation"], jitter["hue"]
    device = torch.device(device)
    lo, hi = _constants(device, (1 - b, 1 - c, 1 - s, -h)), _constants(device, (1 + b, 1 + c, 1 + s, h))
    return dict(crop=sample_crops(n, height, width, g, device), flip=u(n) < 0.5,
                jitter=u(n) < jitter_p, factors=lo + (hi - lo) * u(n, 4), order=u(n, 4).argsort(dim=1),
                gray=u(n) < GRAY_P, blur=u(n) < blur_p, sigma=BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u(n),
                solarize=u(n) < solarize_p)


def apply_view(images, p, dataset, size):
    """The view with parameters p (from view_params) of uint8 images (n, 3, H, W): normalised floats (n, 3, size,
    size). Blur and solarisation only where the dataset has them (Appendix B.5.2)."""
    def where(mask, a, b):
        return torch.where(mask[:, None, None, None], a, b)
    x = resized_crop(images.float() / 255, *p["crop"], size, flip=p["flip"])
    x = colour_jitter(x, p["factors"], p["order"], p["jitter"])
    x = where(p["gray"], grayscale(x).expand_as(x), x)
    if DATASETS[dataset].blur_solarize:
        x = where(p["blur"], gaussian_blur(x, p["sigma"], blur_kernel_size(size)), x)
        x = where(p["solarize"], solarize(x), x)
    return normalise(x, dataset)


def normalise(x, dataset):
    """Per-channel (x - mean) / std with the dataset's statistics (Appendix B.5.1)."""
    info = DATASETS[dataset]
    mean, std = _constants(x.device, info.mean), _constants(x.device, info.std)
    return (x - mean[:, None, None]) / std[:, None, None]


def batched_view(images, dataset, size, blur_p, solarize_p, jitter=JITTER, jitter_p=JITTER_P, *, g):
    """One augmented view of every uint8 image (n, 3, H, W) on its device, each image with its own parameters drawn
    from generator g; `*view` of a view specification (see ssl_augmentation) fills blur_p, solarize_p, jitter,
    jitter_p."""
    return share_view(images, images.shape[0], slice(None), dataset, size, blur_p, solarize_p, jitter, jitter_p, g=g)


def share_view(images, n, rows, dataset, size, blur_p, solarize_p, jitter=JITTER, jitter_p=JITTER_P, *, g):
    """batched_view of the images at `rows` (a slice) of a micro-batch of n images, given only those images: the
    parameters of all n are drawn from g, so an image's view does not depend on how the micro-batch is shared."""
    p = view_params(n, images.shape[-2], images.shape[-1], blur_p, solarize_p, g, images.device, jitter, jitter_p)
    return apply_view(images, {k: tuple(t[rows] for t in v) if isinstance(v, tuple) else v[rows]
                               for k, v in p.items()}, dataset, size)


def eval_view(images, dataset, size):
    """eval_transform of a square in-memory dataset (Appendix B.5.2) for uint8 images (n, 3, H, W) on their device:
    resize to size, centre crop 7/8 of it, resize back to size."""
    x, n, dev = images.float() / 255, images.shape[0], images.device
    const = lambda v: torch.full((n,), float(v), device=dev)  # noqa: E731
    if images.shape[-1] != size:
        x = resized_crop(x, const(0), const(0), const(images.shape[-2]), const(images.shape[-1]), size)
    crop = round(size * 7 / 8)
    offset = int(round((size - crop) / 2))  # torchvision's CenterCrop offset
    return normalise(resized_crop(x, const(offset), const(offset), const(crop), const(crop), size), dataset)


def probe_view(images, dataset, size, g):
    """probe_transform (random resized crop, flip) for uint8 images (n, 3, H, W) on their device, per image."""
    n, dev = images.shape[0], images.device
    crop = sample_crops(n, images.shape[-2], images.shape[-1], g, dev)
    flip = torch.rand(n, device=dev, generator=g) < 0.5
    return normalise(resized_crop(images.float() / 255, *crop, size, flip=flip), dataset)


class DeviceBatches:
    """(images, labels) batches of a labelled in-memory split held on the device as uint8 and transformed there:
    in order through eval_view, or, given a seed, through probe_view in a new random order on every pass."""

    def __init__(self, ds, dataset, size, batch_size, device, seed=None):
        self.images, self.labels = uint8_images(ds).to(device), labels_of(ds).to(device)
        self.dataset, self.size, self.batch_size, self.seed, self.passes = dataset, size, batch_size, seed, 0

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        dev = self.images.device
        if self.seed is None:
            order = torch.arange(len(self.labels), device=dev)
        else:
            g = torch.Generator(dev).manual_seed(self.seed * 1_000_003 + self.passes)
            order = torch.randperm(len(self.labels), device=dev, generator=g)
            self.passes += 1
        for chunk in order.split(self.batch_size):
            x = self.images[chunk]
            x = eval_view(x, self.dataset, self.size) if self.seed is None else probe_view(x, self.dataset,
                                                                                          self.size, g)
            yield x, self.labels[chunk]


def eval_batches(ds, dataset, image_size, batch_size, workers, device=None):
    """(images, labels) batches of one split, in order, through the evaluation transform: on `device` from uint8
    (DeviceBatches) when one is given and the dataset is in memory, else per image in DataLoader workers."""
    if device is not None and dataset in IN_MEMORY:
        return DeviceBatches(ds, dataset, image_size, batch_size, device)
    return DataLoader(Transformed(ds, eval_transform(dataset, image_size)), batch_size=batch_size,
                      num_workers=workers, worker_init_fn=workers_ignore_signals)


def eval_loaders(data, dataset, image_size, batch_size, workers, device=None):
    """eval_batches of the bank (labelled train) and eval splits."""
    return tuple(eval_batches(ds, dataset, image_size, batch_size, workers, device) for ds in (data.bank, data.eval))


def use_device_data(augment, dataset):
    """--augment auto/batched: in-memory datasets are held and transformed on the training device."""
    return augment != "per-image" and dataset in IN_MEMORY
