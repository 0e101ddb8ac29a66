"""`python -m hf_gam.compression CHECKPOINT`: accuracy of a saved image-classification checkpoint before and after
each compression."""

from __future__ import annotations

import argparse
import json

from ..commands import add_checkpoint_arguments, load_checkpoint
from ..measuring import slice_batch
from . import DEFAULT_COMPRESSIONS, Compression, compression_report, format_table


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m hf_gam.compression",
        description="Accuracy of a saved image-classification checkpoint before and after compression (low-bit "
        "weights, int8 dynamic quantization, global magnitude pruning, weight noise), each on a copy.",
    )
    add_checkpoint_arguments(parser, split="test", num_examples=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--compressions", default=",".join(c.kind if c.level is None else f"{c.kind}:{c.level:g}"
                                                          for c in DEFAULT_COMPRESSIONS),
                        help="comma-separated: rtn:BITS, int8_dynamic, prune:FRACTION, noise:STD")
    parser.add_argument("--noise-draws", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    compressions = [Compression.parse(text) for text in args.compressions.split(",") if text.strip()]
    model, batch = load_checkpoint(args)
    n = len(batch["labels"])
    batches = [slice_batch(batch, i, min(i + args.batch_size, n)) for i in range(0, n, args.batch_size)]
    report = compression_report(model, batches, compressions, noise_draws=args.noise_draws, seed=args.seed)
    print(f"{args.checkpoint}: {n} examples of {args.data}" + (f" ({args.split})" if args.data == "digits" else ""))
    print(format_table({"accuracy": report}, compressions))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": args.checkpoint, "num_examples": n, **report}, f, indent=2)
    return report


if __name__ == "__main__":
    main()
