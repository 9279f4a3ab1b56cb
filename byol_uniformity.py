"""BYOL + L_uniformity (Section 3.4, Eq. 4): BYOL with the uniformity loss of Wang & Isola (Eq. 2) on the online
projections, independent of the predictor.

    python byol_uniformity.py --dataset cifar10                     # lambda_uni = 0.125, t = 2 (Section 4)
    python byol_uniformity.py --dataset cifar10 --unif-on encoder   # on f_theta's features (Table 5, App. B.1)

Paper: 91.48 % CIFAR-10 top-1 for ResNet-18 / 300 epochs (Table 5), 94.84 % for ResNet-50 / 1000 epochs (Table 3).
Everything else (model, presets, training) is byol.py's; this file adds only Eq. 4 and its flags.
"""
import sys

import byol
import common


def build_parser():
    p = byol.build_parser(__doc__)
    g = p.add_argument_group("uniformity (Section 3.4, Eq. 4)")
    g.add_argument("--unif-weight", type=float, default=0.125, help="lambda_uni (Section 4)")
    g.add_argument("--unif-t", type=float, default=2.0, help="t of the Gaussian potential (Section 3.4)")
    g.add_argument("--unif-on", default="projector", choices=("projector", "encoder"),
                   help="where L_uni acts: the online projections g_theta(f_theta(x)) (Section 3.4: 'online "
                        "projections') or the encoder features f_theta(x) (Table 5 and Appendix B.1 call the "
                        "encoder f_theta, the symbol of Eq. 4)")
    return p


def uniformity_term(args):
    """Eq. 4: L = L_BYOL + lambda_uni * L_uniformity(f_theta; t), on the online projections z (--unif-on projector)
    or the encoder features h (--unif-on encoder) of both views: the mean of Eq. 2 over the two views, each view's
    B vectors their own set of pairs.

    The pairs come from the (micro-)batch: with --accum-steps N each micro-batch of batch/N images is its own set
    of pairs, as in the paper's batch-size study (Section 5.1, Table C.8). Under torchrun they come from the global
    micro-batch: common.gather brings every process's rows (with their gradients)."""
    v1, v2 = ("z1", "z2") if args.unif_on == "projector" else ("h1", "h2")  # see byol.BYOL.forward

    def terms(model, out):
        uni = sum(common.uniformity_loss(common.gather(out[v]), args.unif_t) for v in (v1, v2)) / 2
        return {"uniformity": (args.unif_weight, uni)}
    return terms


def parse_args(argv=None):
    return byol.parse_args(argv, build_parser(), method="byol_uniformity")


def main(argv=None):
    args = parse_args(argv)
    if args.accum_steps > 1:
        print(f"warning: with --accum-steps {args.accum_steps} the uniformity pairs come from micro-batches of "
              f"{args.batch_size // args.accum_steps} images, not {args.batch_size} (Section 5.1)", file=sys.stderr)
    on = "online projections z" if args.unif_on == "projector" else "online encoder features h"
    objective = (f"{byol.OBJECTIVE} + {args.unif_weight} * L_uniformity(f_theta; t={args.unif_t}) (Eq. 4), "
                 f"L_uniformity(z) = log mean_(i != j) exp(-t ||z_i - z_j||^2) (Eq. 2) on the {on}, "
                 f"averaged over the two views")
    return byol.train(args, extra_terms=uniformity_term(args), objective=objective)


if __name__ == "__main__":
    common.cli(main)
