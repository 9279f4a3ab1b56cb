"""SFRIK (Zheng et al., "Self-supervised learning with rotation-invariant kernels", ICLR 2023): invariance between the
two views plus an MMD that pulls the embeddings towards the uniform law on the hypersphere, with a dot-product kernel
expanded in Legendre polynomials. Wang & Isola's uniformity loss (our Eq. 2, byol_uniformity.py) is the Gaussian
member of this family of kernels; SFRIK truncates the kernel to degrees 1-3.

    python sfrik.py --dataset stl10          # the official STL-10 recipe: ResNet-18, 64 px, batch 2048, 100 epochs
    python sfrik.py --dataset cifar10        # our CIFAR preset (none is published): the BYOL family's batch, epochs

SFRIK reports 70.3 % ImageNet linear top-1 (ResNet-50, 200 epochs, q = 32768); we have measured nothing.
The recipes are those of the official code (valeoai/sfrik, built on VICReg's); CIFAR-10/100 and folder rows are our
choice. The MMD itself, common.mmd_to_uniform, lives in common.py because every run's uniformity analysis logs it.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import loop
from support import cli

# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters: presets[dataset][epochs], the first row per dataset is its default. Any flag overrides them.
# ----------------------------------------------------------------------------------------------------------------
# Official recipes: LARS base LR x batch/256, weight decay 1e-6, lambda_inv 4000 for q = 8192 (40000 for q = 32768).
# Deviation: the official cosine ends at 0.001 x the peak LR; ours (common.lr_at) ends at 0.
# Deviation: the MMD is computed in float32 (common.mmd_to_uniform); the official code runs it in fp16 autocast.
# Deviation: each epoch's last, smaller batch is dropped (loop.pretrain), which the official loader keeps: 48 steps
# per STL-10 epoch (100,000 // 2048), not 49; 625 on ImageNet (1,281,167 // 2048), not 626.
_STL10 = dict(arch="resnet18", batch_size=2048, base_lr=1.2, weight_decay=1e-6, inv_weight=4000.0,
              expander=(8192, 8192, 8192))                                      # official STL-10 command
PRESETS = {
    "stl10": {100: _STL10},
    "imagenet": {200: dict(arch="resnet50", batch_size=2048, base_lr=0.4, weight_decay=1e-6, inv_weight=40000.0,
                           expander=(8192, 8192, 32768))},                      # official ImageNet command
    # Our choice (no CIFAR recipe is published): the STL-10 recipe at the BYOL family's CIFAR batch and epochs.
    "cifar10": {300: dict(_STL10, batch_size=1024)},
    "cifar100": {300: dict(_STL10, batch_size=1024)},
    # Our choice for your own images: the official ImageNet-20 % recipe (ResNet-18, 100 epochs, VICReg's views).
    "folder": {100: _STL10},
}

# Wang & Isola's STL-10 augmentations ("AUH" in the official code): crop, flip, jitter (0.4, 0.4, 0.4, 0.4) always,
# grayscale 0.2, no blur, no solarisation; both views alike. Each view: (blur_p, solarize_p, jitter, jitter_p).
AUH_JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4)
AUH = ((0.0, 0.0, AUH_JITTER, 1.0), (0.0, 0.0, AUH_JITTER, 1.0))
VICREG = ((1.0, 0.0), (0.1, 0.2))  # VICReg's ImageNet set = BYOL's asymmetric one (Appendix B.5)
VIEWS = {"stl10": AUH, "cifar10": AUH, "cifar100": AUH, "imagenet": VICREG, "folder": VICREG}


def expander_widths(text):
    """--expander: layer widths separated by dashes (or commas), e.g. 8192-8192-8192; the last is the embedding
    dimension q >= 2."""
    try:
        out = tuple(int(w) for w in text.replace(",", "-").split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give dash-separated widths, e.g. 8192-8192-8192")
    if min(out) < 1 or out[-1] < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: every width must be a positive integer and the last (the "
                                         f"sphere's dimension q) at least 2")
    return out


def build_parser():
    p = cli.method_parser(__doc__, PRESETS, "SFRIK's official recipes; cifar and folder: ours")
    g = p.add_argument_group("SFRIK (Zheng et al., 2023)")
    g.add_argument("--expander", type=expander_widths, default=None, metavar="W1-W2-...",
                   help="expander widths, Linear-BN-ReLU between them, the last Linear without bias (default: "
                        "preset, 8192-8192-8192; a small one, e.g. 64-64-32, for CPU smoke runs)")
    g.add_argument("--inv-weight", type=cli.finite_float, default=None, help="lambda_inv (default: preset, 4000 for q = 8192)")
    g.add_argument("--mmd-weight", type=cli.finite_float, default=1.0, help="lambda_mmd (official recipes)")
    g.add_argument("--legendre-weights", type=cli.legendre_weights, default=common.LEGENDRE_WEIGHTS,
                   metavar="B1,B2,...", help="b_l >= 0 of psi = sum_l b_l P_l (official recipes: 1,40,40)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def expander(in_dim, widths, batchnorm=True):
    """h: Linear-BN-ReLU for every width but the last, then Linear without bias (as VICReg's and SFRIK's expander)."""
    layers, dims = [], (in_dim, *widths)
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b) if batchnorm else nn.Identity(), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1], bias=False))


class SFRIK(nn.Module):
    """Encoder f and expander h; no predictor, no EMA target, no stop-gradient. Any encoder module works.
    The expander is stored as `projector` (as in the official code), so the uniformity analysis measures its MHE
    beside the other methods' projectors."""

    def __init__(self, encoder, feature_dim, widths=(8192, 8192, 8192), batchnorm=True):
        super().__init__()
        self.encoder = encoder                                      # f
        self.projector = expander(feature_dim, widths, batchnorm)   # h

    def forward(self, x1, x2):
        """Each view in its own forward pass (BatchNorm statistics per view, as SFRIK): z1, z2 (B, q)."""
        return self.projector(self.encoder(x1)), self.projector(self.encoder(x2))


# ----------------------------------------------------------------------------------------------------------------
# Loss: lambda_inv * invariance + lambda_mmd * (M(Z1) + M(Z2)) / 2, M = common.mmd_to_uniform
# ----------------------------------------------------------------------------------------------------------------
def invariance_loss(z1, z2):
    """SFRIK's invariance term: (1 / (n q)) sum_i ||z1_i - z2_i||^2 of the L2-normalised rows of z1, z2 (n, q), the
    mean squared error over all n q entries. 0 for identical views, 4 / q for antipodal ones."""
    with common.fp32(z1):
        return F.mse_loss(F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1))


def sfrik_loss(z1, z2, inv_weight, mmd_weight, weights=common.LEGENDRE_WEIGHTS):
    """L = lambda_inv * invariance(z1, z2) + lambda_mmd * (M(z1) + M(z2)) / 2: each view's n embeddings against the
    uniform law, averaged over the two views. Returns (L, invariance, MMD)."""
    inv = invariance_loss(z1, z2)
    mmd = (common.mmd_to_uniform(z1, weights) + common.mmd_to_uniform(z2, weights)) / 2
    return inv_weight * inv + mmd_weight * mmd, inv, mmd


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def build_model(args, encoder=None, feature_dim=None):
    if encoder is None:
        encoder, feature_dim = common.encoder_for(args)
    return SFRIK(encoder, feature_dim, args.expander, args.batchnorm)


def loss_terms(args):
    """loop.pretrain's loss_fn: (model, x1, x2) -> (L, {"invariance": ..., "mmd": ...}). Under torchrun the loss
    is the global micro-batch's, as SFRIK's (n = the whole batch): common.gather brings every process's rows."""
    def loss_fn(model, x1, x2):
        z1, z2 = model(x1, x2)
        loss, inv, mmd = sfrik_loss(common.gather(z1), common.gather(z2), args.inv_weight, args.mmd_weight,
                                    args.legendre_weights)
        return loss, {"invariance": inv, "mmd": mmd}
    return loss_fn


def train(args, model=None):
    torch.manual_seed(args.seed)
    model = model if model is not None else build_model(args)
    cli.warn_micro_batches(args, "the MMD covers")

    b = ", ".join(f"{w:g}" for w in args.legendre_weights)
    objective = (f"L = {args.inv_weight:g} * mean ||z1/|z1| - z2/|z2|||^2 / q + {args.mmd_weight:g} * (M(Z1) + M(Z2)) "
                 f"/ 2, M(Z) = mean_(i, j) sum_l b_l P_l(<z_i, z_j>), b = ({b}), q = {args.expander[-1]} (SFRIK)")
    return loop.pretrain(args, model, loss_terms(args), views=VIEWS[args.dataset], objective=objective)


def parse_args(argv=None):
    return cli.parse_args(build_parser(), argv, PRESETS, "sfrik")


def main(argv=None):
    args = parse_args(argv)
    cli.warn_if_negative(args.inv_weight, "--inv-weight", "the run pushes the two views of each image apart")
    cli.warn_if_negative(args.mmd_weight, "--mmd-weight", "the run maximises the MMD to the uniform law, "
                            "pulling the embeddings together")
    return train(args)


if __name__ == "__main__":
    common.cli(main)
