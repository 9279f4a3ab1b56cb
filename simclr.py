"""SimCLR (Chen et al., 2020): the contrastive baseline of the paper (Eq. 1; Tables 1-3, Fig. 3b), the point of
comparison for uniformity.

    python simclr.py --dataset cifar10                  # ResNet-18, 300 epochs, temperature 0.5
    python simclr.py --dataset cifar10 --epochs 1000    # ResNet-50, Table 3

Paper (its reproduction, SimCLR*): 93.81 / 70.98 / 82.40 % top-1 on CIFAR-10 / CIFAR-100 / STL-10 for ResNet-50,
1000 epochs (Table 3). The paper does not give its SimCLR* settings: we use SimCLR's own CIFAR recipe (SimCLR
Appendix B.9 and its official CIFAR-10 command: temperature 0.5, LR 1.0 x batch/256, colour distortion strength
0.5, no blur; weight decay 1e-6, the ImageNet value that B.9 keeps for CIFAR, where that command gives 1e-4) at the
BYOL family's batch size and epochs, SimCLR's ImageNet recipe (temperature 0.1, LR 0.3, batch 4096, strength 1.0),
and SimCLR's projection head (BatchNorm on every layer).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import loop
from support import cli

# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters: presets[dataset][epochs], the first row per dataset is its default. Any flag overrides them.
# ----------------------------------------------------------------------------------------------------------------
_CIFAR = dict(base_lr=1.0, weight_decay=1e-6, temperature=0.5,      # SimCLR App. B.9 (its command: wd 1e-4)
              jitter_strength=0.5)
_IMAGENET = dict(base_lr=0.3, weight_decay=1e-6, temperature=0.1,   # SimCLR Section 4 / App. B.1
                 jitter_strength=1.0)                                # SimCLR App. A
PRESETS = {
    "cifar10": {300: dict(arch="resnet18", batch_size=1024, **_CIFAR),     # batch, epochs: as byol.py (B.2)
                1000: dict(arch="resnet50", batch_size=1024, **_CIFAR)},   # Table 3
    "cifar100": {300: dict(arch="resnet18", batch_size=1024, **_CIFAR),
                 1000: dict(arch="resnet50", batch_size=1024, **_CIFAR)},  # Table 3
    "stl10": {1000: dict(arch="resnet50", batch_size=1024, **_CIFAR)},     # Table 3
    "imagenet": {300: dict(arch="resnet50", batch_size=4096, **_IMAGENET),
                 1000: dict(arch="resnet50", batch_size=4096, **_IMAGENET)},  # Table 1 quotes SimCLR at 1000
    "folder": {300: dict(arch="resnet18", batch_size=512, **_IMAGENET)},   # not in the paper
}



def colour_jitter(s):
    """SimCLR's colour distortion of strength s (SimCLR Appendix A): ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s), applied
    with p = 0.8 and followed by grayscale with p = 0.2, as the BYOL family's."""
    return dict(brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s)


def views(jitter_strength):
    """SimCLR's two views, symmetric: blur with p = 0.5 (off for CIFAR and STL-10 anyway, Appendix B.5.2), no
    solarisation, colour distortion of the given strength: view specifications (blur_p, solarize_p, jitter)."""
    return ((0.5, 0.0, colour_jitter(jitter_strength)),) * 2


def build_parser():
    p = cli.method_parser(__doc__, PRESETS, "SimCLR's recipes")
    g = p.add_argument_group("SimCLR (Eq. 1)")
    g.add_argument("--temperature", type=cli.positive_float, default=None, help="NT-Xent temperature (default: preset)")
    g.add_argument("--jitter-strength", default=None,  # brightness and contrast factors 1 +- 0.8 s stay >= 0
                   type=cli.number(float, lambda v: 0 <= v <= 1.25, "between 0 and 1.25"),
                   help="colour distortion strength s, ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), 0 <= s <= 1.25 (default: "
                        "preset, 0.5 for CIFAR/STL-10 as SimCLR App. B.9, 1.0 for ImageNet)")
    g.add_argument("--proj-dim", type=cli.positive_int, default=128,
                   help="projection width; the hidden width is the encoder's feature size (SimCLR Section 2.1)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def projection_head(in_dim, proj_dim=128, batchnorm=True):
    """SimCLR's projector g (its Section 2.1 and code): Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm, d -> d ->
    proj_dim. BatchNorm follows every layer, the last one included; the Linear layers have no bias (BatchNorm
    shifts), and the last BatchNorm only scales (SimCLR's center=False): its shift stays zero, never trained.
    batchnorm=False (Table 4's 'BN x'): the BatchNorms become identities and the first Linear gets its bias."""
    norm = nn.BatchNorm1d if batchnorm else (lambda dim: nn.Identity())
    head = nn.Sequential(nn.Linear(in_dim, in_dim, bias=not batchnorm), norm(in_dim), nn.ReLU(inplace=True),
                         nn.Linear(in_dim, proj_dim, bias=False), norm(proj_dim))
    if batchnorm:
        head[4].bias.requires_grad_(False)
    return head


class SimCLR(nn.Module):
    """Encoder f and projector g: d -> d -> proj_dim (projection_head). Any encoder module works."""

    def __init__(self, encoder, feature_dim, proj_dim=128, batchnorm=True):
        super().__init__()
        self.encoder = encoder
        self.projector = projection_head(feature_dim, proj_dim, batchnorm)

    def forward(self, x1, x2):
        """Both views in one pass, as SimCLR does (BatchNorm statistics over the 2B views): z1, z2 (B, proj_dim)."""
        z = self.projector(self.encoder(torch.cat([x1, x2])))   # (2B, proj_dim)
        return z.chunk(2)


# ----------------------------------------------------------------------------------------------------------------
# Loss (Eq. 1)
# ----------------------------------------------------------------------------------------------------------------
def nt_xent(z1, z2, temperature):
    """Eq. 1 as SimCLR's NT-Xent: each of the 2B L2-normalised projections is an anchor whose positive is the other
    view of its image and whose negatives are the other 2B - 2 views of the batch; cross-entropy of the cosine
    similarities / temperature towards the positive, averaged over the 2B anchors. z1, z2 (B, D)."""
    b = z1.shape[0]
    with common.fp32(z1):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)                         # (2B, D)
        sim = z @ z.T / temperature                                                 # (2B, 2B)
        self_pairs = torch.eye(2 * b, dtype=torch.bool, device=z.device)
        sim = sim.masked_fill(self_pairs, float("-inf"))                            # an anchor is not its own negative
        positive = torch.arange(2 * b, device=z.device).roll(b)   # i <-> i + B; made on the device, not copied there
        return F.cross_entropy(sim, positive)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def build_model(args, encoder=None, feature_dim=None):
    if encoder is None:
        encoder, feature_dim = common.encoder_for(args)
    return SimCLR(encoder, feature_dim, args.proj_dim, args.batchnorm)


def train(args, model=None):
    torch.manual_seed(args.seed)
    model = model if model is not None else build_model(args)
    cli.warn_micro_batches(args, "the negatives come from")

    def loss_fn(model, x1, x2):
        z1, z2 = model(x1, x2)  # under torchrun the negatives are the global micro-batch's, gradients included
        return nt_xent(common.gather(z1), common.gather(z2), args.temperature), {}

    objective = (f"L = NT-Xent(z1, z2; T={args.temperature}) (Eq. 1) = mean over 2B anchors of "
                 f"-log exp(s_pos/T) / sum_(k != anchor) exp(s_k/T), s = cosine similarity, 2B-2 negatives")
    return loop.pretrain(args, model, loss_fn, views=views(args.jitter_strength), objective=objective)


def parse_args(argv=None):
    return cli.parse_args(build_parser(), argv, PRESETS, "simclr")


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    common.cli(main)
