"""`python -m hf_gam.compression CHECKPOINT`: accuracy of a saved image-classification checkpoint before and after
each compression; with `--export SPEC[,SPEC...] --output_dir DIR`, the compressed models written as smaller
`save_pretrained` directories (one spec: DIR itself; several: DIR/<variant> each), measured (`export_report.json`)."""

from __future__ import annotations

import argparse
import json
import os

from ..commands import add_checkpoint_arguments, load_checkpoint
from ..measuring import slice_batch
from . import DEFAULT_COMPRESSIONS, Compression, compression_report, export, format_table, recover_with_trainer
from .exports import variant_name


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m hf_gam.compression",
        description="Accuracy of a saved image-classification checkpoint before and after compression (low-bit "
        "weights, global magnitude pruning, weight noise, torchao integer formats, smaller MLPs), each on a copy; "
        "with --export, the compressed models written as smaller save_pretrained directories.",
    )
    add_checkpoint_arguments(parser, split="test", num_examples=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--compressions", default=",".join(c.spec for c in DEFAULT_COMPRESSIONS),
                        help="comma-separated: rtn:BITS, prune:FRACTION, noise:STD, int8, int8_dynamic, int4, mlp:F, "
                        "mlp:F+OTHER")
    parser.add_argument("--noise-draws", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report to this file")
    parser.add_argument("--export", default=None, metavar="SPEC[,SPEC...]",
                        help="write each compression as a smaller model: int8, int8_dynamic, int4, mlp:F, mlp:F+int8 ...")
    parser.add_argument("--output_dir", "--output-dir", default=None,
                        help="where --export writes (one spec: this directory; several: <dir>/<variant>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    parser.add_argument("--recover_steps", "--recover-steps", type=int, default=0,
                        help="fine-tune an mlp:F model this many steps (GAMTrainer) on --recover-split before quantizing")
    parser.add_argument("--recover_split", "--recover-split", default="train", help="examples of --data to recover on")
    parser.add_argument("--recover_method", "--recover-method", default="gam", choices=("gam", "sam", "none"),
                        help="the recovery's step (GAMConfig's gam_method)")
    parser.add_argument("--recover_learning_rate", "--recover-learning-rate", type=float, default=5e-5)
    parser.add_argument("--latency_repeats", "--latency-repeats", type=int, default=10,
                        help="timings per model and batch size for the export's latency (0: none)")
    args = parser.parse_args(argv)
    if args.export is not None:
        return export_main(parser, args)

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


def export_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """`--export`: every spec checked before the first is written, then each exported and measured."""
    specs = [Compression.parse(text) for text in args.export.split(",") if text.strip()]
    if not specs:
        parser.error("--export needs at least one spec, e.g. --export int8,mlp:0.5+int8")
    if args.output_dir is None:
        parser.error("--export needs --output_dir")
    refused = [spec.spec for spec in specs if not spec.deployable]
    if refused:
        parser.error(f"{', '.join(refused)} store nothing smaller; --export writes int8, int8_dynamic, int4, mlp:F, "
                     "mlp:F+<integer format>")
    model, batch = load_checkpoint(args)
    n = len(batch["labels"])
    batches = [slice_batch(batch, i, min(i + args.batch_size, n)) for i in range(0, n, args.batch_size)]
    processor = _processor(args.checkpoint)
    recover = _recovery(args, model) if args.recover_steps else None
    targets = {spec: args.output_dir if len(specs) == 1 else os.path.join(args.output_dir, variant_name(spec))
               for spec in specs}
    existing = [path for path in targets.values() if os.path.exists(path)]
    if existing and not args.overwrite:
        parser.error(f"{', '.join(existing)} exist; pass --overwrite to replace them")
    reports = {}
    for spec, target in targets.items():
        reports[spec.spec] = export(model, spec, target, batches=batches, processor=processor, overwrite=args.overwrite,
                                    recover=recover if spec.kind == "mlp" else None,
                                    latency_repeats=args.latency_repeats)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": args.checkpoint, "num_examples": n, "exports": reports}, f, indent=2)
    return reports


def _processor(checkpoint: str):
    if not os.path.isfile(os.path.join(checkpoint, "preprocessor_config.json")):
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(checkpoint)


def _recovery(args: argparse.Namespace, model):
    """The `recover` of `--recover_steps`: GAMTrainer on the examples of `--recover_split`."""
    import tempfile

    import torch

    from ..commands import checkpoint_examples
    from ..config import GAMConfig

    batch = checkpoint_examples(args.checkpoint, model, args.data, args.recover_split, None)
    rows = [{key: value[i] for key, value in batch.items()} for i in range(len(batch["labels"]))]
    config = GAMConfig(output_dir=tempfile.gettempdir(), learning_rate=args.recover_learning_rate,
                       per_device_train_batch_size=32, gam_method=args.recover_method, seed=args.seed,
                       use_cpu=not torch.cuda.is_available(), report_to=[], disable_tqdm=True)
    return recover_with_trainer(rows, config, args.recover_steps)


if __name__ == "__main__":
    main()
