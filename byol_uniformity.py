"""BYOL + L_uniformity (Section 3.4, Eq. 4): BYOL with the uniformity loss of Wang & Isola (Eq. 2) on the online
projections, independent of the predictor.

    python byol_uniformity.py --dataset cifar10                         # lambda_uni = 0.125, t = 2 (Section 4)
    python byol_uniformity.py --dataset cifar10 --unif-on encoder       # on f_theta's features (Table 5, App. B.1)
    python byol_uniformity.py --dataset cifar10 --uniformity legendre   # SFRIK's Legendre MMD instead of Eq. 2

Eq. 2 is the Gaussian-kernel member of the family of rotation-invariant kernels whose MMD to the uniform law SFRIK
(sfrik.py) uses; --uniformity legendre swaps in SFRIK's kernel (degrees 1-3, --legendre-weights) on the same tensors.

Paper: 91.48 % CIFAR-10 top-1 for ResNet-18 / 300 epochs (Table 5), 94.84 % for ResNet-50 / 1000 epochs (Table 3).
Everything else (model, presets, training) is byol.py's; this file adds only Eq. 4 and its flags.
"""

import byol
import common
from support import cli


def build_parser():
    p = byol.build_parser(__doc__)
    g = p.add_argument_group("uniformity (Section 3.4, Eq. 4)")
    g.add_argument("--unif-weight", type=cli.finite_float, default=0.125, help="lambda_uni (Section 4)")
    g.add_argument("--unif-t", type=cli.positive_float, default=2.0, help="t of the Gaussian potential (Section 3.4)")
    g.add_argument("--unif-on", default="projector", choices=("projector", "encoder"),
                   help="where L_uni acts: the online projections g_theta(f_theta(x)) (Section 3.4: 'online "
                        "projections') or the encoder features f_theta(x) (Table 5 and Appendix B.1 call the "
                        "encoder f_theta, the symbol of Eq. 4)")
    g.add_argument("--uniformity", default="gaussian", choices=("gaussian", "legendre"),
                   help="gaussian: Eq. 2; legendre: SFRIK's MMD to the uniform law (common.mmd_to_uniform), weighted "
                        "by the same --unif-weight (our choice, not tuned)")
    g.add_argument("--legendre-weights", type=cli.legendre_weights, default=None, metavar="B1,B2,...",
                   help="with --uniformity legendre: b_l >= 0 of psi = sum_l b_l P_l (default: SFRIK's 1,40,40)")
    return p


def uniformity(z, args):
    """The uniformity term of one view's vectors z (B, D), projections or encoder features: Eq. 2 (--uniformity
    gaussian) or SFRIK's Legendre MMD to the uniform law (--uniformity legendre)."""
    if args.uniformity == "legendre":
        return common.mmd_to_uniform(z, args.legendre_weights or common.LEGENDRE_WEIGHTS)
    return common.uniformity_loss(z, args.unif_t)


def uniformity_term(args):
    """Eq. 4: L = L_BYOL + lambda_uni * L_uniformity(f_theta; t), on the online projections z (--unif-on projector)
    or the encoder features h (--unif-on encoder) of both views: the mean of Eq. 2 (or of SFRIK's MMD) over the two
    views, each view's B vectors their own set of pairs.

    The pairs come from the (micro-)batch: with --accum-steps N each micro-batch of batch/N images is its own set
    of pairs, as in the paper's batch-size study (Section 5.1, Table C.8). Under torchrun they come from the global
    micro-batch: common.gather brings every process's rows (with their gradients)."""
    v1, v2 = ("z1", "z2") if args.unif_on == "projector" else ("h1", "h2")  # see byol.BYOL.forward

    def terms(model, out):
        uni = sum(uniformity(common.gather(out[v]), args) for v in (v1, v2)) / 2
        return {"uniformity": (args.unif_weight, uni)}
    return terms


def parse_args(argv=None):
    """byol.parse_args with this file's flags; SFRIK's weights filled for --uniformity legendre (what a run's
    args.json holds)."""
    parser = build_parser()
    args = byol.parse_args(argv, parser, method="byol_uniformity")
    if not hasattr(args, "uniformity"):  # a run resumed from before --uniformity existed
        args.uniformity, args.legendre_weights = "gaussian", None
    if args.uniformity == "legendre" and args.legendre_weights is None:
        args.legendre_weights = common.LEGENDRE_WEIGHTS
    elif args.uniformity == "gaussian" and args.legendre_weights is not None:
        raise common.UserError("--legendre-weights needs --uniformity legendre")
    if args.uniformity == "legendre" and "unif_t" in cli.given_flags(parser, argv):
        raise common.UserError("--unif-t is the t of Eq. 2's Gaussian potential: --uniformity legendre has none "
                               "(its kernel is set by --legendre-weights)")
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.warn_if_negative(args.unif_weight, "--unif-weight", "the run maximises L_uniformity, pulling the "
                            "representations together")
    cli.warn_micro_batches(args, "the uniformity pairs come from")
    on = "online projections z" if args.unif_on == "projector" else "online encoder features h"
    if args.uniformity == "legendre":
        b = ", ".join(f"{w:g}" for w in args.legendre_weights)
        uni = (f"SFRIK's Legendre MMD to the uniform law in place of Eq. 2, "
               f"M(z) = mean_(i, j) sum_l b_l P_l(<z_i, z_j>), b = ({b}),")
    else:
        uni = f"L_uniformity(z) = log mean_(i != j) exp(-t ||z_i - z_j||^2) (Eq. 2), t = {args.unif_t},"
    objective = (f"{byol.OBJECTIVE} + {args.unif_weight} * L_uniformity(f_theta) (Eq. 4), {uni} on the {on}, "
                 f"averaged over the two views")
    return byol.train(args, extra_terms=uniformity_term(args), objective=objective)


if __name__ == "__main__":
    common.cli(main)
