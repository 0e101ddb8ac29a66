"""`python -m hf_gam.landscape --run LABEL=CHECKPOINT ... --out curves.png`: loss curves (and a contour) around saved
checkpoints, on a fixed batch of the bundled digits."""

from __future__ import annotations

import argparse

from ..measuring import stack_examples
from ..vision.digits import digits_examples
from . import loss_curve, loss_surface, plot_contour, plot_curves

DESCRIPTION = "Pictures of the loss around trained weights: 1-D curves and a 2-D contour along random directions."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_gam.landscape", description=DESCRIPTION)
    parser.add_argument("--run", action="append", required=True, help="LABEL=CHECKPOINT_DIR, repeat to compare")
    parser.add_argument("--split", default="train", help="digits split for the fixed batch")
    parser.add_argument("--num-examples", type=int, default=512)
    parser.add_argument("--directions", type=int, default=3)
    parser.add_argument("--radius", type=float, default=1.0)
    parser.add_argument("--points", type=int, default=21)
    parser.add_argument("--out", required=True, help="PNG for the 1-D curves")
    parser.add_argument("--contour", default=None, help="also write a 2-D contour PNG here")
    args = parser.parse_args(argv)

    from transformers import AutoModelForImageClassification

    batch = stack_examples(digits_examples(args.split)[: args.num_examples])
    alphas = [args.radius * (2 * k / (args.points - 1) - 1) for k in range(args.points)]
    curves, surfaces = {}, {}
    for spec in args.run:
        label, path = spec.split("=", 1)
        model = AutoModelForImageClassification.from_pretrained(path)
        curves[label] = [loss_curve(model, batch, alphas, seed=s) for s in range(args.directions)]
        if args.contour:
            surfaces[label] = loss_surface(model, batch, alphas, seed=0)
    plot_curves(curves, alphas, args.out)
    if args.contour:
        plot_contour(surfaces, alphas, args.contour)
    print(f"wrote {args.out}" + (f" and {args.contour}" if args.contour else ""))


if __name__ == "__main__":
    main()
