"""The nouns every method of the paper shares, written once: data, views, model, optimisation, measures.

Durrant & Leontidis, "Hyperspherically Regularized Networks for Self-Supervision" (2022). The method files
(byol.py, byol_uniformity.py, byol_mhe.py, simclr.py, sfrik.py, msbreg.py) import this module and add only their
own model and loss; loop.py trains them. The machinery a reader never needs for the paper (the command line, run
folders and checkpoints, torchrun, the batched on-device views) lives in support/.

Sections, in the order the paper introduces them:
  data            Appendix B.3/B.4: datasets and the fixed held-out validation splits; the epoch's micro-batches
  augmentations   Appendix B.5: the views of each image (torchvision), evaluation transforms
  model           Appendix B.1 / Section 3.6: ResNet encoder with the CIFAR stem, the MLP head
  optimisation    Appendix B.2: LARS, LR warm-up + cosine, EMA schedule tau
  measures        uniformity (Eq. 2), alignment (Eq. A.1), SFRIK's Legendre MMD to the uniform law,
                  hyperspherical energy (Eq. 5, 7, A.3)
  evaluation      the weighted k-NN monitor and the paper's uniformity analysis (Figs. 4, 5)
  device          CUDA or CPU, bf16 autocast and channels_last on CUDA
"""
import argparse
import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.data import Dataset, Subset

from support.distributed import gather  # noqa: F401  (the method files' common.gather: the global batch)
from support.errors import UserError, cli  # noqa: F401  (the method files' common.UserError, common.cli(main))
from support.runs import load_weights


# ----------------------------------------------------------------------------------------------------------------
# Data (Appendix B.3, B.4)
# ----------------------------------------------------------------------------------------------------------------
DATASET_NAMES = ("cifar10", "cifar100", "stl10", "imagenet", "folder")


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    blur_solarize: bool  # Appendix B.5.2: Gaussian blur and solarisation are omitted for CIFAR and STL-10
    val_per_class: int   # Appendix B.4 held-out validation samples per class (0: 10 % of each class)


DATASETS = {
    "cifar10": DatasetInfo(10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), False, 500),
    "cifar100": DatasetInfo(100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), False, 50),
    "stl10": DatasetInfo(10, 64, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), False, 50),
    # Deviation: BYOL holds out the last 10009 images of TensorFlow's ImageNet split; we draw 10 per class
    # (10000 images) with a fixed seed, since that split's file order is not part of an ImageFolder.
    "imagenet": DatasetInfo(1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True, 10),
    # Not in the paper: your own images in class folders, ImageNet statistics and augmentations.
    "folder": DatasetInfo(0, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True, 0),
}


IN_MEMORY = ("cifar10", "cifar100", "stl10")  # small enough to live on the training device as uint8


def holdout_split(targets, per_class, seed=0):
    """Appendix B.4: hold out `per_class` random samples of each class (10 % when 0), the same in every run, and at
    most all but one of a class (which only matters for tiny datasets).

    Returns (train_indices, val_indices) as sorted lists."""
    targets = torch.as_tensor(targets)
    g = torch.Generator().manual_seed(seed)
    val = []
    for c in targets.unique().tolist():
        idx = (targets == c).nonzero().flatten()
        n = min(per_class or max(1, len(idx) // 10), len(idx) - 1)
        val.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    val = torch.cat(val).sort().values
    keep = torch.ones(len(targets), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten().tolist(), val.tolist()


@dataclass
class Data:
    pretrain: Dataset  # images for self-supervised training (labels unused)
    bank: Dataset      # labelled training images: the k-NN memory bank and the linear probe's training set
    eval: Dataset      # labelled val or test images
    num_classes: int


def dataset_targets(ds):
    """The labels of a torchvision dataset (STL-10 calls them labels, the others targets)."""
    return ds.labels if hasattr(ds, "labels") else ds.targets


def load_data(dataset, data_dir, eval_split, subset=None):
    """Datasets as PIL images through torchvision's own loaders (Appendix B.4 splits); `subset` keeps the first
    N images of each split."""
    info, root = DATASETS[dataset], Path(data_dir)
    tv = torchvision.datasets
    try:
        if dataset in ("cifar10", "cifar100"):
            cls = tv.CIFAR10 if dataset == "cifar10" else tv.CIFAR100
            train, test = cls(root, train=True, download=True), cls(root, train=False, download=True)
            unlabeled = train
        elif dataset == "stl10":  # Appendix B.4: pre-train on the unlabeled split
            unlabeled = tv.STL10(root, split="unlabeled", download=True)
            train, test = tv.STL10(root, split="train", download=True), tv.STL10(root, split="test", download=True)
        else:
            for sub in ("train", "val"):
                if not (root / sub).is_dir():
                    raise UserError(f"{dataset} expects image folders {root / 'train'} and {root / 'val'}; "
                                    f"{root / sub} does not exist")
            train, test = (tv.ImageFolder(root / sub, loader=read_image) for sub in ("train", "val"))
            for split in (train, test):
                check_each_folder_once(split)
            if train.classes != test.classes:  # ImageFolder numbers the classes of each folder on its own
                raise UserError(f"{root / 'val'} and {root / 'train'} hold different classes, so their labels "
                                f"would not match: {class_difference(train.classes, test.classes)}")
            unlabeled = train
    except UserError:
        raise
    except Exception as e:  # no network, corrupt files, ...: one line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        cls = {"cifar10": tv.CIFAR10, "cifar100": tv.CIFAR100, "stl10": tv.STL10}.get(dataset)
        if cls is not None:  # what to fetch by hand: torchvision's own archive, and the folder it unpacks to
            msg += f"; without a network, download {cls.url} and unpack it so that {root / cls.base_folder}/ exists"
        raise UserError(f"cannot load {dataset} from {root}: {msg}") from e
    num_classes = info.num_classes or len(train.classes)
    if eval_split == "test":
        data = Data(unlabeled, train, test, num_classes)
    else:
        train_idx, val_idx = holdout_split(dataset_targets(train), info.val_per_class)
        pretrain = unlabeled if unlabeled is not train else Subset(train, train_idx)
        data = Data(pretrain, Subset(train, train_idx), Subset(train, val_idx), num_classes)
    if subset:
        first = lambda ds: Subset(ds, range(min(subset, len(ds))))  # noqa: E731
        data = Data(first(data.pretrain), first(data.bank), first(data.eval), num_classes)
    return data


def check_each_folder_once(images):
    """ImageFolder follows symbolic links, so a link to a folder above it (a loop: train/c0/loop -> . turns 16 images
    into 336) or to another folder of the set would count the same images twice or more. Refuse two folders of
    images that are one folder on disk (one realpath per folder, not per image)."""
    seen = {}
    for folder in dict.fromkeys(os.path.dirname(path) for path, _ in images.samples):
        first = seen.setdefault(os.path.realpath(folder), folder)
        if first != folder:
            raise UserError(f"{folder} is {first} again (through a symbolic link), so its images would be counted "
                            f"twice: remove the link")


def class_difference(train, val):
    """'val lacks a, b; val adds c' for two lists of class names."""
    parts = []
    for what, names in (("val lacks", sorted(set(train) - set(val))), ("val adds", sorted(set(val) - set(train)))):
        if names:
            parts.append(f"{what} {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
    return "; ".join(parts)


def read_image(path):
    """ImageFolder's loader (PIL, RGB) that names the file it cannot read instead of failing in a worker."""
    try:
        return torchvision.datasets.folder.pil_loader(path)
    except (OSError, ValueError, SyntaxError) as e:  # truncated, corrupt or not an image at all
        raise UserError(f"cannot read image {path}: {e}") from None


class Transformed(Dataset):
    """(transform(image), label) over a dataset of (PIL image, label)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return self.transform(image), label


class Views(Dataset):
    """The views of one image, one per transform (two for most methods). Indexed by (index, seed): the
    augmentations of a sample are a pure function of its seed, so a run resumed in the middle of an epoch sees
    exactly the views of the uninterrupted run."""

    def __init__(self, base, *transforms):
        self.base, self.transforms = base, transforms

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        image = self.base[index][0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return tuple(view(image) for view in self.transforms)


class EpochBatches(torch.utils.data.Sampler):
    """Micro-batches of (index, augmentation seed) for one epoch, drawn from (seed, epoch) alone.

    An epoch is `steps` optimizer steps of `accum` micro-batches; the incomplete last batch is dropped. Process
    `rank` of `world` takes the rank-th of `world` equal consecutive parts (`share`) of every global micro-batch."""

    def __init__(self, n, micro_batch, steps, accum, seed, rank=0, world=1):
        self.n, self.micro_batch, self.steps, self.accum, self.seed = n, micro_batch, steps, accum, seed
        self.epoch, self.start = 0, 0
        part = micro_batch // world
        self.share = slice(rank * part, (rank + 1) * part)

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step * self.accum

    def __len__(self):
        return self.steps * self.accum - self.start

    def micro_batches(self, device=None):
        """(image indices on `device`, augmentation seeds) of each remaining global micro-batch of the epoch."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order, seeds = torch.randperm(self.n, generator=g), torch.randint(2**62, (self.n,), generator=g)
        order, m = order.to(device), self.micro_batch
        for b in range(self.start, self.steps * self.accum):
            yield order[b * m:(b + 1) * m], seeds[b * m:(b + 1) * m]

    def __iter__(self):
        for index, seeds in self.micro_batches():
            yield list(zip(index[self.share].tolist(), seeds[self.share].tolist()))


# ----------------------------------------------------------------------------------------------------------------
# Augmentations (Appendix B.5)
# ----------------------------------------------------------------------------------------------------------------
def blur_kernel_size(image_size):
    """23x23 at 224 px (Appendix B.5), scaled with the image size to the nearest odd size."""
    return max(3, 2 * round((23 * image_size / 224 - 1) / 2) + 1)


# Appendix B.5, shared by the per-image pipeline below and its batched twin (support/batched_views.py).
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)           # area fraction; aspect ratio, log-uniform


JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)   # BYOL's; a view may give its own (simclr.py)


JITTER_P, GRAY_P, BLUR_SIGMA = 0.8, 0.2, (0.1, 2.0)


def ssl_augmentation(dataset, image_size, blur_p, solarize_p, jitter=JITTER, jitter_p=JITTER_P):
    """On CIFAR/STL-10, `--augment auto` samples this same distribution on the device (support/batched_views.py,
    pinned by tests/test_batched_augment.py): to change the augmentation, change both or run `--augment per-image`.

    One view of Appendix B.5 for one PIL image, in the paper's order: crop, flip, colour jitter, grayscale, blur,
    solarise: the readable reference, and the pipeline of imagenet/folder and of `--augment per-image`.
    A view specification is (blur_p, solarize_p), (blur_p, solarize_p, jitter) or (blur_p, solarize_p, jitter,
    jitter_p) (sfrik.py's STL-10 recipe jitters with p = 1): `*view` fills these arguments."""
    info = DATASETS[dataset]
    ops = [
        T.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        # ColorJitter applies brightness, contrast, saturation and hue in a random order for each image.
        T.RandomApply([T.ColorJitter(**jitter)], p=jitter_p),
        T.RandomGrayscale(p=GRAY_P),  # luma 0.2989 r + 0.587 g + 0.114 b
    ]
    if info.blur_solarize and blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(image_size), sigma=BLUR_SIGMA)], p=blur_p))
    ops.append(T.ToTensor())
    if info.blur_solarize and solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=0.5, p=solarize_p))  # x -> 1 - x where x >= 0.5, on [0, 1]
    ops.append(T.Normalize(info.mean, info.std))
    return T.Compose(ops)


def eval_transform(dataset, image_size):
    """Appendix B.5.1/B.5.2: CIFAR centre crop 28 then resize 32; STL-10 56 then 64 (after resizing the 96 px
    images to 64); ImageNet resize 256 then centre crop 224. Other sizes scale these ratios."""
    info = DATASETS[dataset]
    bicubic = T.InterpolationMode.BICUBIC
    if info.blur_solarize:  # ImageNet-style
        ops = [T.Resize(round(image_size * 256 / 224), interpolation=bicubic), T.CenterCrop(image_size)]
    else:
        ops = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(round(image_size * 7 / 8)),
               T.Resize(image_size, interpolation=bicubic)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(info.mean, info.std)])


def probe_transform(dataset, image_size):
    """Linear-probe training augmentation: random resized crop and horizontal flip (BYOL / SimCLR protocol)."""
    info = DATASETS[dataset]
    return T.Compose([T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(info.mean, info.std)])


# ----------------------------------------------------------------------------------------------------------------
# Model (Appendix B.1, Section 3.6)
# ----------------------------------------------------------------------------------------------------------------
ARCHS = {"resnet18": 512, "resnet50": 2048}  # feature dimension after global average pooling


def resolve_stem(stem, dataset):
    """Appendix B.1 changes the stem 'for the CIFAR datasets' only, so STL-10 (64 px) keeps torchvision's."""
    if stem != "auto":
        return stem
    return "cifar" if dataset in ("cifar10", "cifar100") else "imagenet"


def build_encoder(arch, stem, batchnorm=True, zero_init_residual=True):
    """torchvision ResNet with `fc` removed, so it outputs the pooled feature (512 or 2048 wide).

    stem='cifar' (Appendix B.1): conv1 becomes 3x3 with stride 1 and the max-pool is removed.
    batchnorm=False replaces every BatchNorm by the identity (Table 4). With zero_init_residual each block's last
    BatchNorm scale starts at zero, as in official BYOL's (Haiku) and SimCLR's ResNets, whose procedure Section 3.6
    follows. The first author's code, from which the paper's numbers come, leaves it at one (its zero_init_residual
    argument is commented out: torchvision's False); zero_init_residual=False (--no-zero-init-residual) builds that."""
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")
    norm_layer = None if batchnorm else (lambda channels: nn.Identity())
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer,
                                            zero_init_residual=batchnorm and zero_init_residual)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, ARCHS[arch]


def encoder_for(args):
    """The encoder a run's settings (a Namespace or its vars() dict) describe: (module, feature size)."""
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    # A run from before a flag was added lacks its key: it was trained with what is now the flag's default.
    return build_encoder(args["arch"], resolve_stem(args["stem"], args["dataset"]), args.get("batchnorm", True),
                         args.get("zero_init_residual", True))


def mlp(in_dim, hidden_dim=4096, out_dim=256, batchnorm=True):
    """Projector g and predictor q of Section 3.6: Linear -> BatchNorm -> ReLU -> Linear, the last Linear without
    bias as in BYOL's code."""
    norm = nn.BatchNorm1d(hidden_dim) if batchnorm else nn.Identity()
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), norm, nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False))


def encoder_from_checkpoint(ckpt, source="the checkpoint"):
    """Rebuild the online encoder f_theta stored in any method's checkpoint (read from `source`)."""
    encoder, dim = encoder_for(ckpt["args"])
    prefix = "encoder."
    load_weights(encoder, {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)},
                 source)
    return encoder, dim


# ----------------------------------------------------------------------------------------------------------------
# Optimisation (Appendix B.2)
# ----------------------------------------------------------------------------------------------------------------
# Deviation: the LR sits inside the momentum buffer (v <- m v + lr u; w <- w - v: SimCLR's form); official BYOL,
# VICReg and SFRIK keep v unscaled and step w <- w - lr v. Equal at a constant LR; see docs/deviations.md.
class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as used by SimCLR and BYOL (Appendix B.2).

    For a weight w with ndim > 1 and gradient g:   u = g + wd * w,   u <- eta * ||w|| / ||u|| * u
    For biases and BatchNorm parameters (ndim <= 1):   u = g   (no weight decay, no trust ratio)
    Then, with momentum m:   v <- m * v + lr * u,   w <- w - v
    """

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust_coefficient=1e-3):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        """The formula above for all parameters at once with torch._foreach_* ops: a few kernels per step, and the
        trust ratios stay on the device (no host synchronisation)."""
        for group in self.param_groups:
            params = [w for w in group["params"] if w.grad is not None]
            if not params:
                continue
            for w in params:
                if "momentum_buffer" not in self.state[w]:
                    self.state[w]["momentum_buffer"] = torch.zeros_like(w)
            weights = [w for w in params if w.ndim > 1]                       # trust ratio and weight decay
            others = [w for w in params if w.ndim <= 1]                       # biases, BatchNorm: plain SGD
            u = []
            if weights:
                u = list(torch._foreach_add([w.grad for w in weights], weights, alpha=group["weight_decay"]))
                w_norm, u_norm = torch.stack(torch._foreach_norm(weights)), torch.stack(torch._foreach_norm(u))
                trust = torch.where((w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm, 1.0)
                torch._foreach_mul_(u, list(trust.unbind()))
            updates = u + [w.grad for w in others]
            buffers = [self.state[w]["momentum_buffer"] for w in weights + others]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates, alpha=group["lr"])
            torch._foreach_sub_(weights + others, buffers)


def scaled_lr(base_lr, batch_size):
    """Appendix B.2: LR = LR_base x BatchSize / 256 (also the linear probe's, as BYOL's evaluation scales it)."""
    return base_lr * batch_size / 256


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Appendix B.2: linear warm-up from 0 to peak_lr over warmup_steps, then cosine decay to 0 at total_steps.
    peak_lr = LR_base * batch / 256."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_tau(step, total_steps, tau_base):
    """Appendix B.2: tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, from tau_base at k=0 to 1 at k=K."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total_steps) + 1) / 2


# ----------------------------------------------------------------------------------------------------------------
# Measures: uniformity (Eq. 2), alignment (Eq. A.1), SFRIK's Legendre MMD, hyperspherical energy (Eq. 5, 7, A.3)
# ----------------------------------------------------------------------------------------------------------------
def fp32(x):
    """Leave any autocast region: these measures are computed in float32 (a bf16 exp/arccos is too coarse)."""
    return torch.autocast(x.device.type, enabled=False)


def uniformity_loss(z, t=2.0):
    """Eq. 2 (Wang & Isola, 2020): log of the mean of exp(-t ||z_i - z_j||^2) over the distinct pairs of the
    L2-normalised rows of z (B, D). Lower is more uniform on the hypersphere."""
    with fp32(z):
        z = F.normalize(z.float(), dim=1)
        return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log()


def alignment_loss(x, y, alpha=2):
    """Eq. A.1: mean of ||x_i - y_i||^alpha over positive pairs of L2-normalised rows of x, y (B, D)."""
    with fp32(x):
        x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
        return (x - y).norm(dim=1).pow(alpha).mean()


def legendre(t, degree, dim):
    """The Legendre (Gegenbauer) polynomial P_l of `degree` l in dimension q = `dim`, normalised so that P_l(1) = 1
    (Zheng et al., 2023, SFRIK): P_0 = 1, P_1(t) = t, P_2(t) = (q t^2 - 1) / (q - 1), P_3(t) = ((q + 2) t^3 - 3 t) /
    (q - 1), and in general P_(k+1) = ((2k + q - 2) t P_k - k P_(k-1)) / (k + q - 2). For q = 3 they are Legendre's,
    for q = 2 Chebyshev's cos(l theta). t: a tensor of cosines, entrywise."""
    if dim < 2 or degree < 0:
        raise ValueError(f"need dim >= 2 and degree >= 0, got dim={dim}, degree={degree}")
    previous, p = torch.ones_like(t), t
    if degree == 0:
        return previous
    for k in range(1, degree):
        previous, p = p, ((2 * k + dim - 2) * t * p - k * previous) / (k + dim - 2)
    return p


LEGENDRE_WEIGHTS = (1.0, 40.0, 40.0)  # b_1, b_2, b_3 of SFRIK's official recipes


def mmd_to_uniform(z, weights=LEGENDRE_WEIGHTS):
    """SFRIK's uniformity term (Zheng et al., 2023): the squared MMD between the L2-normalised rows z_i of z (n, q)
    and the uniform law on the sphere S^(q-1), for the rotation-invariant kernel psi(<x, y>) = sum_l b_l P_l(<x, y>)
    with b = `weights` (b_1, b_2, ...) >= 0. Every P_l with l >= 1 averages to 0 against the uniform law, so
        M(Z) = (1 / n^2) sum_(i, j) psi(<z_i, z_j>),   all n^2 pairs, the diagonal included.
    0 for a spherical design of strength len(weights), sum(weights) for a collapse. Computed in float32."""
    with fp32(z):
        z = F.normalize(z.float(), dim=1)
        gram = z @ z.T                                                      # (n, n) cosines
        psi = sum(b * legendre(gram, l, z.shape[1]) for l, b in enumerate(weights, start=1))
        return psi.mean()


MHE_POWERS = ("0", "1", "2", "a0", "a1", "a2")


MHE_EPS = 1e-6  # keeps identical / opposite neurons finite: squared distances >= eps, cosines inside [-1+eps, 1-eps]


def hyperspherical_energy(weight, power):
    """Hyperspherical energy of one layer's neurons (Liu et al., 2018), normalised by 1 / (N (N - 1)) as in Eq. 7.

    A neuron is a row of a linear weight (N, d) or an output filter of a conv weight (N, C, k, k) flattened to
    C*k*k; neurons are projected onto the unit sphere. power: "0", "1", "2" use the Euclidean distance
    d_ij = ||w_i - w_j|| (Eq. 5), "a0", "a1", "a2" the angle d_ij = arccos(w_i . w_j) (Eq. A.3); the kernel is
    d^-s for s > 0 and log(1 / d) for s = 0. Returns sum_{i != j} r_s(d_ij) / (N (N - 1)) as a float32 scalar."""
    return layer_energies(weight.flatten(1)[None], power)[0]


def layer_energies(neurons, power):
    """hyperspherical_energy of G layers of equal shape at once: neurons (G, N, d) -> (G,), one batched Gram product."""
    if power not in MHE_POWERS:
        raise ValueError(f"power must be one of {MHE_POWERS}, got {power!r}")
    s = int(power[-1])
    with fp32(neurons):
        w = F.normalize(neurons.float(), dim=-1)                           # (G, N, d) on the unit sphere
        n = w.shape[-2]
        cos = w @ w.transpose(-1, -2)                                      # (G, N, N)
        if power.startswith("a"):
            d = torch.arccos(cos.clamp(-1 + MHE_EPS, 1 - MHE_EPS))         # geodesic distance, Eq. A.3
        else:
            d = (2 - 2 * cos).clamp_min(MHE_EPS).sqrt()                   # ||w_i - w_j||^2 = 2 - 2 cos, Eq. 5
        r = -torch.log(d) if s == 0 else d.pow(-s)                          # Riesz s-kernel; log(1/d) for s = 0
        diagonal = torch.eye(n, dtype=torch.bool, device=w.device)
        return r.masked_fill(diagonal, 0).sum(dim=(-2, -1)) / (n * (n - 1))


def total_energy(weights, power):
    """The sum of hyperspherical_energy over a list of layer weights, layers of equal shape batched together."""
    groups = {}
    for w in weights:
        groups.setdefault(tuple(w.shape), []).append(w.flatten(1))
    return sum(layer_energies(torch.stack(group), power).sum() for group in groups.values())


def layer_weights(module):
    """The neurons' weights of a network: every conv and linear weight (ndim > 1); biases and BatchNorm excluded."""
    return [p for p in module.parameters() if p.ndim > 1]


SUBNETWORKS = ("encoder", "projector", "predictor")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the weighted k-NN monitor and the uniformity analysis (Figs. 4, 5)
# ----------------------------------------------------------------------------------------------------------------
def knn_predict(bank, bank_labels, queries, num_classes, k=200, t=0.1):
    """Weighted k-NN of InstDisc (Wu et al., 2018): the k bank features most cosine-similar to a query vote for
    their class with weight exp(s / t). bank (M, D) and queries (Q, D) are L2-normalised. Returns (Q, C) scores."""
    scores = []
    for q in queries.split(1024):
        s, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)       # (Q', k)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        scores.append(votes.scatter_add_(1, bank_labels[idx], (s / t).exp()))
    return torch.cat(scores)


@contextlib.contextmanager
def eval_mode(module):
    """Evaluate without touching training state: eval mode (BatchNorm statistics frozen), no autograd, and every
    submodule's train/eval flag restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, training in modes:
            m.training = training


def encode(encoder, x, device):
    """The features of one batch x: moved to the device, encoded under its autocast, returned in float32."""
    with autocast(device):
        return encoder(to_device(x, device)).float()


def extract_features(encoder, loader, device, normalize=True):
    """Encoder features (L2-normalised unless normalize=False) and labels of a whole loader, in fp32."""
    feats, labels = [], []
    with eval_mode(encoder):
        for x, y in loader:
            f = encode(encoder, x, device)
            feats.append(F.normalize(f, dim=1) if normalize else f)
            labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(encoder, bank_loader, eval_loader, num_classes, device, k=200, t=0.1):
    """Top-1 (%) of the weighted k-NN classifier: bank = labelled train split, queries = eval split."""
    bank, bank_labels = extract_features(encoder, bank_loader, device)
    queries, labels = extract_features(encoder, eval_loader, device)
    return accuracy(knn_predict(bank, bank_labels, queries, num_classes, k, t), labels, 1)


def accuracy(scores, labels, k=1):
    """Top-k accuracy (%): the label is among the k highest scores (Appendix B.4)."""
    k = min(k, scores.shape[1])
    return 100.0 * (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()


def analysis_images(ds, n, seed=0):
    """The uniformity analysis' images: n of the split drawn once with a fixed seed, spread over the whole split
    (the first n of a class-sorted ImageFolder would cover a few classes), the same at every evaluation and run."""
    index = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, index.sort().values.tolist())


def residual_blocks(encoder):
    """{torchvision module path: block} of every residual block of a ResNet, e.g. layer1.0 ... layer4.1 for
    ResNet-18 (8 blocks), layer1.0 ... layer4.2 for ResNet-50 (16). A stage's output is its last block's output."""
    kinds = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
    return {name: m for name, m in encoder.named_modules() if isinstance(m, kinds)}


def analysis_row(model, clean, pairs, power, device):
    """The paper's uniformity analysis, logged under eval_ names so that no training term is overwritten, from
    `clean` (batches of eval images through the evaluation transform) and `pairs` (batches of two augmented views of
    the same images): eval_uniformity (Eq. 2, t=2) and eval_mmd_legendre (SFRIK's Legendre MMD to the uniform law,
    b = 1, 40, 40) of the L2-normalised encoder features of the clean images; eval_alignment (Eq. A.1) between the
    features of the two views; eval_mhe_<sub-network>, the MHE objective of each sub-network with `power`
    (Fig. 5b); and eval_energy_<block>, the hyperspherical energy of each ResNet block's globally pooled output over
    the clean images (Fig. 4: "the output of each ResNet block"), named by the block's torchvision module path
    (eval_energy_layer1.0, ...). loop.representation_analysis builds the batches."""
    encoder = model.encoder
    blocks = residual_blocks(encoder)
    pooled = {name: [] for name in blocks}
    hooks = [block.register_forward_hook(
        lambda module, inputs, output, name=name: pooled[name].append(output.float().mean(dim=(2, 3))))
        for name, block in blocks.items()]
    with eval_mode(encoder):
        try:
            feats = torch.cat([encode(encoder, x, device) for x in clean])
        finally:
            for h in hooks:
                h.remove()
        f1, f2 = zip(*[(encode(encoder, x1, device), encode(encoder, x2, device)) for x1, x2 in pairs])
        row = {"eval_uniformity": uniformity_loss(feats).item(),
               "eval_alignment": alignment_loss(torch.cat(f1), torch.cat(f2)).item(),
               "eval_mmd_legendre": mmd_to_uniform(feats).item()}
        for part in SUBNETWORKS:
            if hasattr(model, part):
                row[f"eval_mhe_{part}"] = total_energy(layer_weights(getattr(model, part)), power).item()
        for name, outputs in pooled.items():
            row[f"eval_energy_{name}"] = hyperspherical_energy(torch.cat(outputs), power).item()
    return row


# ----------------------------------------------------------------------------------------------------------------
# Device
# ----------------------------------------------------------------------------------------------------------------
def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    if name == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 matmuls (the MHE Gram, k-NN) on TF32 tensor cores
        torch.backends.cudnn.benchmark = True       # batch shapes never change: time cuDNN's convolutions once
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def place(model, device, compile=False):
    """Move a model to the device (channels_last on CUDA) and optionally torch.compile it in place (parameter names
    and so checkpoints stay the same)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model


def to_device(x, device):
    if device.type == "cuda":
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device)
