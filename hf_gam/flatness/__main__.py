"""`python -m hf_gam.flatness CHECKPOINT`: the flatness measures of a saved image-classification checkpoint."""

from __future__ import annotations

import argparse
import json

from ..commands import add_checkpoint_arguments, load_checkpoint
from . import measure_flatness


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m hf_gam.flatness",
        description="Top Hessian eigenvalue, Hessian trace and first-order flatness of a saved "
        "image-classification checkpoint on a fixed set of examples, measured in chunks.",
    )
    add_checkpoint_arguments(parser, split="train", num_examples=256)
    parser.add_argument("--chunk-size", type=int, default=16,
                        help="examples per forward/double-backward pass; peak memory is that of one chunk")
    parser.add_argument("--eig-iters", type=int, default=20)
    parser.add_argument("--trace-samples", type=int, default=20)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--ascent-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, batch = load_checkpoint(args)
    result = measure_flatness(
        model, batch, eig_iters=args.eig_iters, trace_samples=args.trace_samples, rho=args.rho,
        ascent_steps=args.ascent_steps, seed=args.seed, chunk_size=args.chunk_size,
    )
    result["num_examples"] = len(batch["labels"])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
