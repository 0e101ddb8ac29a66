"""Write a compressed model as a smaller model a user deploys: a `save_pretrained` directory that a plain
`AutoModelForImageClassification.from_pretrained(directory)` loads (torchao installed for the integer formats), with
what it keeps measured next to the model it came from.

`export(model, "mlp:0.5+int8", "outputs/model-mlp_0.5-int8", batches=..., processor=...)`:
1. checks everything first: the compression is one that stores smaller (`Compression.DEPLOYABLE`: `int8`,
   `int8_dynamic`, `int4`, `mlp:F`, `mlp:F+<integer format>`), the model is a whole, unquantized `PreTrainedModel`,
   and `output_dir` does not exist (or `overwrite=True`);
2. shrinks the MLPs of a copy (`mlp:F`), optionally fine-tunes that copy (`recover`, e.g. `recover_with_trainer`),
   and quantizes it by loading it with `TorchAoConfig` (Transformers' own path, so that the saved config records
   the quantization and `from_pretrained` reads the integer weights back);
3. writes the model (safetensors), the image processor if given, and `export_report.json` into a directory beside
   `output_dir`, reloads that directory and checks that its logits equal the compressed model's, measures, and
   only then moves the directory into place. An export that fails or is interrupted leaves no `output_dir`.

The report (`export_report.json`, also returned) holds, for the uncompressed model as saved and for the export:
top-1 accuracy on `batches`, weights on disk (bytes of the weight files), parameter count, and CPU latency at batch
1 and 32 (median of `latency_repeats` timings, the two models timed in alternation). The trained model passed in
is never changed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from . import Compression, _logits, _unwrap, accuracy
from .deploy import INTEGER_FORMATS, check_int4_widths, is_quantized, require_torchao, shrink_mlp, torchao_config

__all__ = ["REPORT_NAME", "check_exportable", "export", "recover_with_trainer", "variant_name", "weights_size"]

REPORT_NAME = "export_report.json"
"""The file of measurements written beside the exported weights."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def variant_name(compression: Compression | str) -> str:
    """A directory or repository name for the variant: 'int8', 'mlp_0.5', 'mlp_0.5-int8'."""
    compression = Compression.parse(compression) if isinstance(compression, str) else compression
    return compression.name.replace("+", "-")


def weights_size(directory: str) -> int:
    """Bytes of the weight files (`*.safetensors`, `*.bin`, ...) in `directory`, the size a download costs."""
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
               if name.endswith(WEIGHT_SUFFIXES))


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _integer_format(compression: Compression) -> str | None:
    for part in (compression, compression.then):
        if part is not None and part.kind in INTEGER_FORMATS:
            return part.kind
    return None


def _mlp_fraction(compression: Compression) -> float | None:
    return compression.level if compression.kind == "mlp" else None


def check_exportable(model: nn.Module, compression: Compression | str) -> nn.Module:
    """Every refusal of `export` that depends on the model and the compression, not on where it is written: a
    compression that stores nothing smaller, a model that is not a whole, unquantized `PreTrainedModel`, a missing
    torchao, `mlp:F` on an architecture it does not recognise, int4 on widths its group size does not divide.
    Returns the model to export (unwrapped). The recipes call it before training."""
    compression = Compression.parse(compression) if isinstance(compression, str) else compression
    if not compression.deployable:
        raise ValueError(
            f"{compression.spec!r} stores nothing smaller ({compression.description}: the weights stay in floating "
            "point); export writes int8, int8_dynamic, int4, mlp:F and mlp:F+<integer format>."
        )
    source = _unwrap(model)  # refuses sharded (DTensor) parameters
    if not hasattr(source, "save_pretrained") or not hasattr(source, "config"):
        raise TypeError(f"export needs a Transformers model (a PreTrainedModel); got {type(source).__name__}.")
    if is_quantized(source):
        raise ValueError(f"{type(source).__name__} is already quantized; export the floating-point model it came from.")
    if any(p.device.type == "meta" for p in source.parameters()):
        raise ValueError("The model has weights on the meta device (offloaded or not loaded); export needs them all.")
    if _integer_format(compression) is not None:
        require_torchao()
    shaped = source
    if _mlp_fraction(compression) is not None:
        shaped = shrink_mlp(copy.deepcopy(source), compression.level)  # the architecture and level, on a copy
    if _integer_format(compression) == "int4":
        check_int4_widths(shaped)
    return source


def _check(model: nn.Module, compression: Compression, output_dir: str, overwrite: bool) -> nn.Module:
    """Every refusal, before anything is written; returns the model to export (unwrapped)."""
    source = check_exportable(model, compression)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"{output_dir} exists and is not a directory.")
    return source


def _example_input(model: nn.Module, batches: Sequence[Mapping] | None, batch_size: int) -> dict:
    """Model inputs of `batch_size` examples: the first example of `batches` repeated, or random pixels."""
    if batches:
        first = {k: v for k, v in batches[0].items() if k != "labels" and isinstance(v, torch.Tensor)}
        return {k: v[:1].cpu().expand(batch_size, *v.shape[1:]).contiguous() for k, v in first.items()}
    config = model.config
    size = getattr(config, "image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch_size, getattr(config, "num_channels", 3), *size, generator=generator)}


@torch.no_grad()
def _latencies(models: Mapping[str, nn.Module], batches, batch_sizes: Sequence[int], repeats: int) -> dict:
    """`{model name: {"batch_B": median milliseconds}}`, the models timed in alternation (one warm-up each)."""
    result = {name: {} for name in models}
    for batch_size in batch_sizes:
        inputs = _example_input(next(iter(models.values())), batches, batch_size)
        times = {name: [] for name in models}
        for model in models.values():
            model(**inputs)
        names = list(models)
        for repeat in range(repeats):
            for name in names if repeat % 2 == 0 else reversed(names):
                start = time.perf_counter()
                models[name](**inputs)
                times[name].append(time.perf_counter() - start)
        for name in models:
            result[name][f"batch_{batch_size}"] = 1000 * statistics.median(times[name])
    return result


def _same_outputs(saved: nn.Module, in_memory: nn.Module, inputs: dict) -> float:
    """The largest difference between the two models' logits on `inputs`, relative to the logits' scale."""
    with torch.no_grad():
        a = _logits(saved(**inputs)).float()
        b = _logits(in_memory(**inputs)).float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _versions() -> dict[str, str | None]:
    import transformers

    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "torchao": torchao_version}


def export(
    model: nn.Module,
    compression: Compression | str,
    output_dir: str,
    *,
    batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
    processor=None,
    overwrite: bool = False,
    recover: Callable[[nn.Module], nn.Module] | None = None,
    latency_repeats: int = 10,
    batch_sizes: Sequence[int] = (1, 32),
    log: Callable[[str], None] = print,
) -> dict:
    """Write `model` compressed by `compression` (e.g. `"int8"`, `"mlp:0.5+int8"`) to `output_dir` as a
    `save_pretrained` directory, with `export_report.json` beside the weights; returns that report.

    `batches`: labelled input dicts to measure accuracy on (none: accuracy is not measured). `processor`: saved with
    the model (an image processor or any object with `save_pretrained`). `recover(model) -> model`: fine-tunes the
    shrunk floating-point model before quantization (`recover_with_trainer`). `latency_repeats=0` skips timing.
    Raises before writing anything for a compression that stores nothing smaller, an unknown architecture for
    `mlp:F`, a sharded or quantized model, or an existing `output_dir` without `overwrite`.
    """
    compression = Compression.parse(compression) if isinstance(compression, str) else compression
    output_dir = os.path.abspath(output_dir)
    source = _check(model, compression, output_dir, overwrite)
    batches = list(batches) if batches is not None else None
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    model_class = type(source)
    try:
        log(f"Exporting {compression.spec} ({compression.description}) to {output_dir}")
        reference_dir = os.path.join(work, "reference")
        source.save_pretrained(reference_dir)
        shaped = model_class.from_pretrained(reference_dir).eval()
        if _mlp_fraction(compression) is not None:
            shrink_mlp(shaped, compression.level)
            if recover is not None:
                shaped = recover(shaped).eval()
        integer = _integer_format(compression)
        if integer is not None:
            from transformers import TorchAoConfig

            float_dir = os.path.join(work, "float")
            shaped.save_pretrained(float_dir)
            deployed = model_class.from_pretrained(float_dir, quantization_config=TorchAoConfig(
                quant_type=torchao_config(integer))).eval()
        else:
            deployed = shaped
        target = os.path.join(work, "export")
        deployed.save_pretrained(target)
        if processor is not None:
            processor.save_pretrained(target)

        reference = model_class.from_pretrained(reference_dir).eval()
        saved = model_class.from_pretrained(target).eval()
        difference = _same_outputs(saved, deployed, _example_input(saved, batches, 2))
        if not difference <= 1e-5:
            raise RuntimeError(f"The saved {compression.spec} model does not reproduce the compressed model "
                               f"(relative logit difference {difference:.3g}); nothing was written.")
        report = {
            "compression": compression.spec,
            "description": compression.description,
            "recovered": recover is not None and _mlp_fraction(compression) is not None,
            "num_examples": sum(len(b["labels"]) for b in batches) if batches else 0,
            "original": {"weights_bytes": weights_size(reference_dir), "parameters": _parameters(reference)},
            "compressed": {"weights_bytes": weights_size(target), "parameters": _parameters(saved)},
            "versions": _versions(),
        }
        if batches:
            log(f"  measuring accuracy on {report['num_examples']} examples")
            report["original"]["accuracy"] = accuracy(reference, batches)
            report["compressed"]["accuracy"] = accuracy(saved, batches)
            report["accuracy_change"] = report["compressed"]["accuracy"] - report["original"]["accuracy"]
        report["size_ratio"] = report["compressed"]["weights_bytes"] / report["original"]["weights_bytes"]
        if latency_repeats > 0:
            log(f"  timing batch sizes {list(batch_sizes)} ({latency_repeats} repeats each, alternating)")
            timings = _latencies({"original": reference, "compressed": saved}, batches, batch_sizes, latency_repeats)
            for name in ("original", "compressed"):
                report[name]["latency_ms"] = timings[name]
            report["latency_ratio"] = {key: timings["compressed"][key] / timings["original"][key]
                                       for key in timings["original"]}
        with open(os.path.join(target, REPORT_NAME), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)

        previous = os.path.join(work, "previous")
        if os.path.exists(output_dir):
            os.rename(output_dir, previous)
        try:
            os.rename(target, output_dir)
        except BaseException:
            if os.path.exists(previous):
                os.rename(previous, output_dir)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    accuracy_text = (f", accuracy {report['original']['accuracy']:.4f} -> {report['compressed']['accuracy']:.4f}"
                     if batches else "")
    log(f"  {compression.spec}: weights {report['original']['weights_bytes'] / 1e6:.2f} MB -> "
        f"{report['compressed']['weights_bytes'] / 1e6:.2f} MB ({report['size_ratio']:.2f}x){accuracy_text}")
    return report


def recover_with_trainer(train_dataset, args, steps: int, data_collator=None, trainer_class=None,
                         **trainer_kwargs) -> Callable[[nn.Module], nn.Module]:
    """A `recover` for `export`: fine-tune the shrunk model for `steps` optimizer steps with `GAMTrainer` (or
    `trainer_class`) and a copy of `args` (a `GAMConfig`: the run's own step, GAM or stock, its learning rate and
    schedule over the `steps`), saving and evaluating nothing. `args` itself is not changed."""
    import dataclasses

    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"The recovery needs a positive number of steps; got {steps!r}.")

    def recover(model: nn.Module) -> nn.Module:
        from ..trainer import GAMTrainer

        work = tempfile.mkdtemp(prefix="hf_gam-recover-")
        try:
            recovery_args = dataclasses.replace(
                args, output_dir=work, max_steps=steps, save_strategy="no", eval_strategy="no",
                load_best_model_at_end=False, push_to_hub=False, report_to=[], logging_strategy="no",
                warmup_steps=0, hub_token=None, resume_from_checkpoint=None,
            )
            trainer = (trainer_class or GAMTrainer)(model=model, args=recovery_args, train_dataset=train_dataset,
                                                   data_collator=data_collator, **trainer_kwargs)
            trainer.train()
            return _unwrap(trainer.model).cpu()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return recover

