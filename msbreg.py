"""MSBReg (Moon, Buracas, Park, Kim, Canny, "An Embedding-Dynamic Approach to Self-supervised Learning", arXiv
2207.03552, 2022): BYOL with more than two views of each image and three forces on the embeddings, read as point
particles: an attractive force between the views of an image (multiview centroid loss), a global dispersive force
(singular value loss) and a local dispersive force (Brownian diffusive loss).

    python msbreg.py --dataset cifar10                  # M = 4 views, lambda_S = lambda_B = 1 (our defaults)
    python msbreg.py --dataset cifar10 --views 2 --sv-weight 0 --brownian-weight 0   # byol.py (float rounding)

A RECONSTRUCTION. No official code is public and only the paper's abstract and introduction could be read, so
each formula below is our reading of a sentence of the paper, and M and the two weights are our untuned choices
(each a flag). The model, EMA target, presets and training are byol.py's; this file adds the M views, the three
loss terms and their flags. With M = 2 and both weights 0 the objective is BYOL's.

The centroid loss is defined by two sentences of the paper, verbatim. The abstract: "a Multiview centroid loss,
which applies an attractive force to pull different image view embeddings toward their centroid". The figure
caption of the introduction (arXiv v1): "A Multiview centroid loss (green), where we train our online network to
minimize the distance between centroids of online and target network embeddings of different views of the same
image." Neither says leave-one-out, and the two do not say the same thing. --centroid chooses the reading:
leave-one-out (default) is our leave-one-out reading, chosen so that M = 2 is BYOL; centroid-to-centroid is the
caption's; all-views is the abstract's (see centroid_loss and the two functions after it).
"""

import torch
import torch.nn.functional as F

import byol
import common
import loop
from support import cli

# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters: byol.PRESETS (Appendix B.2 of Durrant & Leontidis) for everything BYOL has. The paper's M and
# weights could not be read: these three are ours, untuned.
# ----------------------------------------------------------------------------------------------------------------
VIEWS = 4               # ours: M, the paper's "more than two views"; twice BYOL's compute per image
SV_WEIGHT = 1.0         # ours: lambda_S, unit weight
BROWNIAN_WEIGHT = 1.0   # ours: lambda_B, unit weight
CENTROID = "leave-one-out"   # ours: neither of the paper's two sentences; chosen so that M = 2 is BYOL


def view_specs(m):
    """The augmentation of each of the M views: BYOL's two asymmetric settings (byol.VIEWS: blur 1.0 / no
    solarisation, blur 0.1 / solarisation 0.2) alternate, so M = 2 is BYOL's pair. Ours: the paper says only that
    it uses more than two views."""
    return tuple(byol.VIEWS[i % 2] for i in range(m))


def build_parser():
    p = byol.build_parser(__doc__)
    g = p.add_argument_group("MSBReg (Moon et al., 2022; our reconstruction, defaults ours)")
    g.add_argument("--views", default=VIEWS,
                   type=cli.number(int, lambda m: m >= 2, "at least 2 (the centroid loss compares views)"),
                   help="M, views of each image (at least 2), alternating between BYOL's two augmentation settings; "
                        "ours: the paper's M could not be read")
    g.add_argument("--sv-weight", type=cli.finite_float, default=SV_WEIGHT,
                   help="lambda_S of the singular value loss (ours, untuned)")
    g.add_argument("--brownian-weight", type=cli.finite_float, default=BROWNIAN_WEIGHT,
                   help="lambda_B of the Brownian diffusive loss (ours, untuned)")
    g.add_argument("--centroid", default=CENTROID, choices=tuple(CENTROID_READINGS),
                   help="reading of the multiview centroid loss: leave-one-out (ours, M = 2 is BYOL), "
                        "centroid-to-centroid (the paper's v1 figure caption), all-views (the paper's abstract)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Model: byol.BYOL's networks on M views
# ----------------------------------------------------------------------------------------------------------------
class MSBReg(byol.BYOL):
    """BYOL's networks (online f_theta, g_theta, q_theta; EMA target f_xi, g_xi), applied to M views. It also counts
    the Brownian noise draws so far; the count is saved with the weights (nn.Module extra state), so a resumed run
    continues the same noise sequence."""

    def __init__(self, encoder, feature_dim, hidden_dim=4096, proj_dim=256, batchnorm=True):
        super().__init__(encoder, feature_dim, hidden_dim, proj_dim, batchnorm)
        self.noise_draws = 0

    def forward(self, *views):
        """Views x_1..x_M (B, 3, H, W) -> online projections z, predictions p and target projections t, each
        (M, B, proj_dim). Each view is a separate forward pass, so BatchNorm statistics are per view, as in BYOL."""
        z = [self.projector(self.encoder(x)) for x in views]
        p = [self.predictor(z_m) for z_m in z]
        with torch.no_grad():
            t = [self.target_projector(self.target_encoder(x)) for x in views]
        return torch.stack(z), torch.stack(p), torch.stack(t)

    def noise_generator(self, seed, device):
        """The generator of the next micro-batch's Brownian noise, seeded by (seed, number of earlier draws); the
        2**62 keeps these seeds apart from common.EpochBatches' (seed, epoch) ones."""
        g = torch.Generator(device).manual_seed((2**62 + seed * 1_000_003 + self.noise_draws) % 2**63)
        self.noise_draws += 1
        return g

    def get_extra_state(self):
        return {"noise_draws": self.noise_draws}

    def set_extra_state(self, state):
        self.noise_draws = state["noise_draws"]


# ----------------------------------------------------------------------------------------------------------------
# Loss: the three forces. B images, M views; n(x) = x / ||x||, the L2 normalisation.
# ----------------------------------------------------------------------------------------------------------------
def centroid_loss(p, t):
    """(i) Multiview centroid loss: our leave-one-out reading, chosen so that M = 2 is BYOL (--centroid
    leave-one-out, the default). Neither of the paper's two sentences (quoted at the top of this file) says
    leave-one-out: the caption's reading is centroid_to_centroid_loss, the abstract's all_views_centroid_loss.

    L_C = (2 / M) sum_m mean_b ||n(p_bm) - c_bm||^2 with c_bm = n(sum_(k != m) n(t_bk)), the normalised
    centroid of the target projections of the other views of image b (a view never predicts its own target);
    ||n(p) - c||^2 = 2 - 2 n(p).c as in byol.byol_loss. With M = 2 this is BYOL's symmetric loss (Eq. 3, both
    directions summed), up to float rounding (t is normalised twice); the 2 / M keeps BYOL's scale for any M: twice
    the mean over views of a squared distance of unit vectors, so L_C lies in [0, 8]. The gradient reaches the
    predictions p only: t is detached (BYOL's stop-gradient). p, t (M, B, D); float32."""
    m = p.shape[0]
    with common.fp32(p):
        p, t = F.normalize(p.float(), dim=-1), F.normalize(t.detach().float(), dim=-1)
        others = 1 - torch.eye(m, device=t.device)                                # (M, M): k != m
        c = F.normalize(torch.einsum("mk,kbd->mbd", others, t), dim=-1)          # (M, B, D) leave-one-out centroids
        return 2 / m * (2 - 2 * (p * c).sum(dim=-1)).mean(dim=1).sum()


def centroid_to_centroid_loss(p, t):
    """(i) Multiview centroid loss, the v1 figure caption's reading (--centroid centroid-to-centroid): the distance
    between the centroid of the online embeddings and that of the target embeddings of the views of one image.

    L_C = 2 mean_b ||n(mean_m n(p_bm)) - n(mean_m n(t_bm))||^2. The online embeddings are the predictions p, as in
    centroid_loss; predictions and targets are normalised before they are averaged (each view counts alike) and
    the centroids after (a distance of unit vectors, as in centroid_loss). One distance per image, times 2: the
    scale of centroid_loss (twice a mean of squared distances of unit vectors), so L_C lies in [0, 8]. The gradient
    reaches every prediction through its image's online centroid; t is detached (BYOL's stop-gradient). Only the
    centroids are matched: views that disagree cost nothing while their mean direction is the targets'.
    p, t (M, B, D); float32."""
    with common.fp32(p):
        p, t = F.normalize(p.float(), dim=-1), F.normalize(t.detach().float(), dim=-1)
        online, target = F.normalize(p.mean(dim=0), dim=-1), F.normalize(t.mean(dim=0), dim=-1)   # (B, D) each
        return 2 * (2 - 2 * (online * target).sum(dim=-1)).mean()


def all_views_centroid_loss(p, t):
    """(i) Multiview centroid loss, the abstract's reading (--centroid all-views): each view's embedding is pulled
    toward the centroid of all the views of its image, its own included.

    L_C = (2 / M) sum_m mean_b ||n(p_bm) - c_b||^2 with c_b = n(sum_k n(t_bk)): centroid_loss with the view's own
    target in the centroid, and on its scale (L_C in [0, 8]). The centroid is that of the target projections, so
    that, as in BYOL, the pull moves the online predictions p only: t is detached and the centroid does not move
    toward the predictions. p, t (M, B, D); float32."""
    m = p.shape[0]
    with common.fp32(p):
        p, t = F.normalize(p.float(), dim=-1), F.normalize(t.detach().float(), dim=-1)
        c = F.normalize(t.sum(dim=0), dim=-1)                                       # (B, D) all-views centroids
        return 2 / m * (2 - 2 * (p * c).sum(dim=-1)).mean(dim=1).sum()


# --centroid: reading -> (loss, formula for the objective line). With M = 2, B = 1, t_1 = e_1, t_2 = e_2 and each
# prediction its own view's target they give 4 (leave-one-out: each view is 2 from the other's target), 0 and
# 2 (2 - sqrt 2) = 1.17 (all-views: 2 - sqrt 2 = 0.586 per view from the centroid (e_1 + e_2) / sqrt 2).
CENTROID_READINGS = {
    "leave-one-out": (centroid_loss, "L_C = (2/M) sum_m ||n(p_m) - c_m||^2, c_m = n(sum_(k != m) n(t_k)) "
                                     "(leave-one-out centroid of the target projections)"),
    "centroid-to-centroid": (centroid_to_centroid_loss, "L_C = 2 ||n(mean_m n(p_m)) - n(mean_m n(t_m))||^2 "
                                                        "(centroid of the predictions to centroid of the target "
                                                        "projections: the paper's figure caption)"),
    "all-views": (all_views_centroid_loss, "L_C = (2/M) sum_m ||n(p_m) - c||^2, c = n(sum_k n(t_k)) (centroid "
                                           "of all views' target projections: the paper's abstract)"),
}


def singular_value_loss(z):
    """(ii) Singular value loss. The paper: decorrelates the feature dimensions so that the embeddings disperse
    uniformly, a global dispersive force towards a homogeneous density.

    Ours (the paper's formula could not be read; this is the SVMax regulariser of Taha et al., 2021):
    L_S = -(1 / r) sum_k sigma_k(n(Z_m)), the mean singular value of the (B x D) matrix of normalised embeddings of
    view m, r = min(B, D), averaged over the views. Rows have unit norm, so sum_k sigma_k^2 = B: the loss is
    largest, -sqrt(B) / r, under collapse (one non-zero singular value) and smallest, -sqrt(B / r), when all r
    singular values are equal (the embeddings use every direction equally). z (M, B, D) or (B, D); float32 (no SVD
    in bf16). A non-finite z (a diverged run) gives NaN, as every other loss does, for the run's check of the loss to
    report: the SVD itself would raise on it."""
    with common.fp32(z):
        z = F.normalize(z.float(), dim=-1)
        finite = z.isfinite().all()  # a tensor on the device: no wait for the host
        return torch.where(finite, -torch.linalg.svdvals(torch.where(finite, z, 0.0)).mean(), float("nan"))


def brownian_loss(z, generator):
    """(iii) Brownian diffusive loss. The paper: a random motion of each embedding that needs no other embedding's
    position, a local dispersive force against local collapse; it has an implicit contrastive effect and stretches
    weak links more than strong ones.

    Ours: L_B = mean over b, m of cos(z_bm, eps_bm), eps_bm ~ N(0, I) drawn afresh for every embedding from
    `generator`. Its gradient (n(eps) - cos(z, eps) n(z)) / ||z|| is a zero-mean random step tangent to the sphere:
    Brownian motion of each particle; the value itself carries no information. z (..., D); float32."""
    with common.fp32(z):
        eps = torch.randn(z.shape, generator=generator, device=z.device)
        return (F.normalize(z.float(), dim=-1) * F.normalize(eps, dim=-1)).sum(dim=-1).mean()


def loss_terms(model, views, sv_weight, brownian_weight, seed=0, centroid=CENTROID):
    """L = L_C + lambda_S L_S + lambda_B L_B on the M views (x_1, ..., x_M) of one micro-batch: the centroid loss
    (the reading `centroid`, a key of CENTROID_READINGS) on the online predictions, the two dispersive forces on the
    online projections z (the embedding layer).
    Under torchrun the dispersive forces see the global micro-batch (common.gather), and every process draws the
    same noise for all of it, so the run equals the one-process run."""
    z, p, t = model(*views)                                                       # each (M, B, D)
    z_all = torch.stack([common.gather(z_m) for z_m in z])                      # (M, W * B, D), W processes
    terms = {"centroid": CENTROID_READINGS[centroid][0](p, t), "sv": singular_value_loss(z_all),
             "brownian": brownian_loss(z_all, model.noise_generator(seed, z.device))}
    loss = terms["centroid"] + sv_weight * terms["sv"] + brownian_weight * terms["brownian"]
    return loss, terms


def objective(args):
    return (f"L = L_C + {args.sv_weight} * L_S + {args.brownian_weight} * L_B over M = {args.views} views (MSBReg, "
            f"our reconstruction): {CENTROID_READINGS[args.centroid][1]}; "
            f"L_S = -mean singular value of n(z) of each view; "
            f"L_B = mean cos(z, eps), eps ~ N(0, I) per embedding and step")


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def build_model(args, encoder=None, feature_dim=None):
    if encoder is None:
        encoder, feature_dim = common.encoder_for(args)
    return MSBReg(encoder, feature_dim, args.hidden_dim, args.proj_dim, args.batchnorm)


def train(args, model=None):
    """Pre-train MSBReg with byol.py's EMA; returns loop.pretrain's exit status."""
    torch.manual_seed(args.seed)
    model = model if model is not None else build_model(args)

    def loss_fn(model, *views):
        return loss_terms(model, views, args.sv_weight, args.brownian_weight, args.seed, args.centroid)

    return loop.pretrain(args, model, loss_fn, views=view_specs(args.views), after_step=byol.ema_step(args),
                           objective=objective(args))


def parse_args(argv=None):
    args = byol.parse_args(argv, build_parser(), method="msbreg")
    if not hasattr(args, "centroid"):  # resuming a run from before --centroid: it trained the leave-one-out reading
        args.centroid = CENTROID
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.warn_if_negative(args.sv_weight, "--sv-weight", "the run shrinks the singular values, pulling the "
                            "embeddings of a view onto fewer directions")
    cli.warn_if_negative(args.brownian_weight, "--brownian-weight", "Gaussian noise is symmetric, so this is the "
                            "same random walk as its positive value")
    cli.warn_micro_batches(args, "the singular values are those of")
    return train(args)


if __name__ == "__main__":
    common.cli(main)
