"""BYOL (Grill et al., 2020) as reproduced in Section 3.3 of Durrant & Leontidis (2022): the baseline that
byol_uniformity.py (Eq. 4) and byol_mhe.py (Eq. 7) extend by one loss term each.

    python byol.py --dataset cifar10              # ResNet-18, 300 epochs, batch 1024 (Appendix B.2)
    python byol.py --dataset cifar10 --epochs 1000 # ResNet-50, Table 3 settings

Paper: 90.74 % CIFAR-10 top-1 for ResNet-18 / 300 epochs (Table C.7), 94.46 % for ResNet-50 / 1000 epochs (Table 3).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import loop
from support import cli

# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters: presets[dataset][epochs], the first row per dataset is its default. Any flag overrides them.
# ----------------------------------------------------------------------------------------------------------------
# Deviation: the paper gives the weight decay only for ImageNet (Appendix B.2); we use its 1.5e-6 (also
# Appendix D) for CIFAR and STL-10.
PRESETS = {
    "cifar10": {
        300: dict(arch="resnet18", batch_size=1024, base_lr=1.5, tau_base=0.99, weight_decay=1.5e-6),   # B.2, Sec. 5
        1000: dict(arch="resnet50", batch_size=1024, base_lr=1.0, tau_base=0.996, weight_decay=1.5e-6), # B.2, Tab. 3
    },
    "cifar100": {
        300: dict(arch="resnet18", batch_size=1024, base_lr=1.5, tau_base=0.99, weight_decay=1.5e-6),   # as CIFAR-10
        1000: dict(arch="resnet50", batch_size=1024, base_lr=1.0, tau_base=0.996, weight_decay=1.5e-6), # B.2, Tab. 3
    },
    "stl10": {
        1000: dict(arch="resnet50", batch_size=1024, base_lr=0.45, tau_base=0.996, weight_decay=1.5e-6), # B.2, Tab. 3
    },
    "imagenet": {
        300: dict(arch="resnet50", batch_size=512, base_lr=0.3, tau_base=0.99, weight_decay=1e-6),      # B.2, Tab. 2
        1000: dict(arch="resnet50", batch_size=4096, base_lr=0.2, tau_base=0.996, weight_decay=1.5e-6), # B.2, Tab. 1
    },
    # Not in the paper: your own images; ImageNet's 300-epoch recipe on a ResNet-18.
    "folder": {
        300: dict(arch="resnet18", batch_size=512, base_lr=0.3, tau_base=0.99, weight_decay=1e-6),
    },
}

# Appendix B.5 / BYOL: (blur probability, solarisation probability) of view 1 and view 2.
VIEWS = ((1.0, 0.0), (0.1, 0.2))


def build_parser(description=__doc__):
    """BYOL's flags on top of the shared ones; byol_uniformity.py and byol_mhe.py add theirs to this."""
    p = cli.method_parser(description, PRESETS, "Appendix B.2")
    g = p.add_argument_group("BYOL (Section 3.3, Section 3.6)")
    g.add_argument("--tau-base", type=cli.unit_interval, default=None, help="EMA tau_base, raised to 1 by a cosine (Appendix B.2)")
    g.add_argument("--hidden-dim", type=cli.positive_int, default=4096, help="MLP hidden width of g and q (Section 3.6)")
    g.add_argument("--proj-dim", type=cli.positive_int, default=256, help="projection width (Section 3.6)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Model (Fig. 1, Section 3.6)
# ----------------------------------------------------------------------------------------------------------------
class BYOL(nn.Module):
    """Online network: encoder f_theta, projector g_theta, predictor q_theta. Target network f_xi: an exponential
    moving average of the online encoder and projector that never receives gradients.

    Any encoder module works: it maps images (B, 3, H, W) to features (B, feature_dim)."""

    def __init__(self, encoder, feature_dim, hidden_dim=4096, proj_dim=256, batchnorm=True):
        super().__init__()
        self.encoder = encoder                                                       # f_theta
        self.projector = common.mlp(feature_dim, hidden_dim, proj_dim, batchnorm)    # g_theta
        self.predictor = common.mlp(proj_dim, hidden_dim, proj_dim, batchnorm)       # q_theta
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)      # f_xi
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)  # g_xi

    def forward(self, x1, x2):
        """Views x1, x2 (B, 3, H, W) -> encoder features h (B, feature_dim), projections z, predictions p (online)
        and targets z_xi, each (B, proj_dim). Each view is a separate forward pass, so BatchNorm statistics are per
        view, as in BYOL."""
        h1, h2 = self.encoder(x1), self.encoder(x2)
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_encoder(x1))
            t2 = self.target_projector(self.target_encoder(x2))
        return dict(h1=h1, h2=h2, z1=z1, z2=z2, p1=p1, p2=p2, t1=t1, t2=t2)

    def online_target_pairs(self):
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    @torch.no_grad()
    def update_target(self, tau):
        """xi <- tau * xi + (1 - tau) * theta for every parameter. The target's BatchNorm running statistics are its
        own (updated by its forward passes), as in BYOL's implementation."""
        online = [p for o, _ in self.online_target_pairs() for p in o.parameters()]
        target = [p for _, t in self.online_target_pairs() for p in t.parameters()]
        torch._foreach_lerp_(target, online, 1 - tau)  # all parameters in a few kernels


# ----------------------------------------------------------------------------------------------------------------
# Loss (Eq. 3)
# ----------------------------------------------------------------------------------------------------------------
def byol_loss(p, z):
    """Eq. 3: || p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z), averaged over the batch; p, z (B, D); z is detached."""
    p, z = F.normalize(p.float(), dim=1), F.normalize(z.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def loss_terms(model, x1, x2, extra_terms=None):
    """L_BYOL applied symmetrically (view 1 predicts view 2's target and vice versa), the two directions summed as
    in BYOL's code; plus lam * term for every (lam, term) that `extra_terms(model, out)` returns by name."""
    out = model(x1, x2)
    byol = byol_loss(out["p1"], out["t2"]) + byol_loss(out["p2"], out["t1"])
    loss, terms = byol, {"byol": byol}
    for name, (lam, value) in (extra_terms(model, out) if extra_terms else {}).items():
        loss = loss + lam * value
        terms[name] = value
    return loss, terms


OBJECTIVE = "L = L_BYOL (Eq. 3) = ||q(z1)/|q(z1)| - z'2/|z'2|||^2 + ||q(z2)/|q(z2)| - z'1/|z'1|||^2"


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def build_model(args, encoder=None, feature_dim=None):
    if encoder is None:
        encoder, feature_dim = common.encoder_for(args)
    return BYOL(encoder, feature_dim, args.hidden_dim, args.proj_dim, args.batchnorm)


def ema_step(args):
    """loop.pretrain's after_step: the EMA moves once per optimizer step, never per micro-batch."""
    def after_step(model, step, total_steps):
        tau = common.ema_tau(step, total_steps, args.tau_base)
        model.update_target(tau)
        return {"tau": tau}
    return after_step


def train(args, model=None, extra_terms=None, objective=OBJECTIVE):
    """Pre-train BYOL (plus the variants' `extra_terms`); returns loop.pretrain's exit status."""
    torch.manual_seed(args.seed)
    model = model if model is not None else build_model(args)
    return loop.pretrain(args, model, lambda m, x1, x2: loss_terms(m, x1, x2, extra_terms),
                           views=VIEWS, after_step=ema_step(args), objective=objective)


def parse_args(argv=None, parser=None, method="byol"):
    return cli.parse_args(parser or build_parser(), argv, PRESETS, method)


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    common.cli(main)
