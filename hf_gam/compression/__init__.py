"""Accuracy of a model after compression: low-bit weights, pruning, weight noise, and the integer formats and
smaller MLPs a user deploys (written as smaller models by `export`).

Flat minima are meant to buy something a user can deploy: a model that keeps its accuracy when its weights are
rounded, pruned or perturbed. This module measures that. Every compression runs on a deep copy of the model, so the
trained weights, their gradients and the global random state are never touched.

Compressions (`Compression`, named by `Compression.parse`):
* `rtn:B` (`weights_Bbit`): weight-only round-to-nearest quantization of every `nn.Linear` and `nn.Conv*d` weight
  to B bits, one scale and one integer zero point per output channel (asymmetric min-max over the channel, with 0
  inside the range): `q = clamp(round(w / s) + z, 0, 2^B - 1)`, `w' = s (q - z)`, `s = (max - min) / (2^B - 1)`,
  `z = round(-min / s)`. Biases and normalization layers stay in floating point.
* `int8`, `int8_dynamic`, `int4` (same names): torchao's int8 weight-only, int8 weights with activations quantized
  on the fly, and 4-bit weight-only (groups of 32) on every `nn.Linear` (`deploy.py`; torchao is the `deploy`
  extra). Convolutions stay in floating point.
* `mlp:F` (`mlp_F`): the fraction F of the MLP neurons of every layer of a ViT-style model removed, a smaller model
  (`deploy.shrink_mlp`); `mlp:F+OTHER` (`mlp_F+OTHER`) then applies another compression.
* `prune:F` (`pruned_P`, P = 100 F): global magnitude pruning with `torch.nn.utils.prune.global_unstructured`: the
  fraction F of all `nn.Linear` and `nn.Conv*d` weights with the smallest magnitude, counted over all of them
  together, set to zero.
* `noise:S` (`noise_S`): Gaussian weight noise, each `nn.Linear`/`nn.Conv*d` weight tensor W gets
  W + S rms(W) e with e ~ N(0, 1); the accuracy is the mean over `noise_draws` draws of a seeded generator.

`compression_report(model, batches)` returns `{"baseline": accuracy, name: accuracy after compression, ...}`;
`CompressionCallback` logs it as `compression/*` at the end of training or at every evaluation, on a bounded
number of evaluation examples; `python -m hf_gam.compression CHECKPOINT` measures a saved checkpoint.
`DEFAULT_COMPRESSIONS` are the ones that need only torch; `DEPLOYABLE_COMPRESSIONS` the formats `export` writes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..measuring import BoundCallback, as_batches, take_examples, to_device, unwrap as unwrap_wrappers
from .deploy import (
    INT4_GROUP_SIZE,
    INTEGER_FORMATS,
    is_quantized,
    mlp_blocks,
    mlp_keep_indices,
    quantize_dynamic_int8,
    quantize_int4_weights,
    quantize_int8_weights,
    shrink_mlp,
)

__all__ = [
    "DEFAULT_COMPRESSIONS",
    "DEPLOYABLE_COMPRESSIONS",
    "Compression",
    "CompressionCallback",
    "accuracy",
    "add_weight_noise",
    "check_exportable",
    "compressible_modules",
    "compression_report",
    "descriptions",
    "export",
    "format_table",
    "prune_global_magnitude",
    "is_quantized",
    "mlp_blocks",
    "mlp_keep_indices",
    "quantize_dynamic_int8",
    "quantize_int4_weights",
    "quantize_int8_weights",
    "quantize_weights_rtn",
    "shrink_mlp",
    "report_over_ranks",
]

_COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def compressible_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(name, module)` of every `nn.Linear` and `nn.Conv1d/2d/3d` of `model` (the layers whose weights are compressed)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, _COMPRESSIBLE)]


def _weights(model: nn.Module) -> list[nn.Module]:
    modules = [module for _, module in compressible_modules(model)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv layer to compress.")
    return modules


# --------------------------------------------------------------------------------------------------
# The compressions, each in place on the model it is given (`Compression.apply` hands them a copy)


@torch.no_grad()
def quantize_weights_rtn(model: nn.Module, bits: int) -> nn.Module:
    """Round every Linear/Conv weight of `model` to `bits` bits, per output channel, in place; returns `model`.

    Per output channel c (row c of the weight flattened to `(out_channels, -1)`): `lo = min(0, min w)`,
    `hi = max(0, max w)`, `s = (hi - lo) / (2^bits - 1)` (1 for an all-zero channel), `z = round(-lo / s)`,
    `w' = s (clamp(round(w / s) + z, 0, 2^bits - 1) - z)`. Computed in float32 (float64 for float64 weights).
    """
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise ValueError(f"bits must be an integer in [1, 16]; got {bits!r}.")
    levels = 2**bits - 1
    for module in _weights(model):
        weight = module.weight
        w = weight.detach().flatten(1).to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        lo = w.min(dim=1, keepdim=True).values.clamp(max=0)
        hi = w.max(dim=1, keepdim=True).values.clamp(min=0)
        scale = (hi - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, levels)
        weight.copy_(((q - zero) * scale).view_as(weight).to(weight.dtype))
    return model


@torch.no_grad()
def prune_global_magnitude(model: nn.Module, fraction: float) -> nn.Module:
    """Zero the `fraction` of all Linear/Conv weights of `model` with the smallest magnitude (counted over all those
    layers together: `torch.nn.utils.prune.global_unstructured` with `L1Unstructured`), in place and permanently
    (`prune.remove`: no mask or hook is left); returns `model`."""
    from torch.nn.utils import prune

    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"The pruned fraction must lie in [0, 1]; got {fraction!r}.")
    targets = [(module, "weight") for module in _weights(model)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=float(fraction))
    for module, name in targets:
        prune.remove(module, name)
    return model


@torch.no_grad()
def add_weight_noise(model: nn.Module, std: float, generator: torch.Generator) -> nn.Module:
    """Add `std * rms(W) * e`, e ~ N(0, 1) drawn from `generator` (on the CPU), to every Linear/Conv weight W of
    `model`, in place; returns `model`."""
    if not std >= 0:
        raise ValueError(f"The noise level must be a non-negative number; got {std!r}.")
    for module in _weights(model):
        weight = module.weight
        rms = weight.detach().double().pow(2).mean().sqrt()
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        weight.add_((noise * (std * rms.cpu())).to(weight.device, weight.dtype))
    return model


@dataclass(frozen=True)
class Compression:
    """One compression: `kind` is one of `KINDS`, `level` its bits, fraction or relative std (None for the integer
    formats). `then` is a second compression applied after `mlp:F`: `Compression.parse("mlp:0.5+int8")`."""

    kind: str
    level: float | None = None
    then: "Compression | None" = None

    KINDS = ("rtn", "int8", "int8_dynamic", "int4", "prune", "mlp", "noise")
    DEPLOYABLE = ("int8", "int8_dynamic", "int4", "mlp")
    """The kinds whose result is stored smaller: `hf_gam.compression.export` writes them."""

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"Unknown compression {self.kind!r}; known: {', '.join(self.KINDS)} (combine mlp:F with "
                             "another one with '+', e.g. 'mlp:0.5+int8').")
        if (self.level is None) != (self.kind in INTEGER_FORMATS):
            raise ValueError(f"Compression {self.kind!r} " + ("takes no level." if self.kind in INTEGER_FORMATS
                                                              else f"needs a level, e.g. '{self.kind}:{_EXAMPLE[self.kind]}'."))
        if self.kind == "rtn" and not (float(self.level).is_integer() and 1 <= self.level <= 16):
            raise ValueError(f"rtn needs a whole number of bits in [1, 16]; got {self.level!r}.")
        if self.kind == "prune" and not 0.0 <= self.level <= 1.0:
            raise ValueError(f"prune needs a fraction in [0, 1]; got {self.level!r}.")
        if self.kind == "mlp" and not 0.0 <= self.level < 1.0:
            raise ValueError(f"mlp needs the fraction of MLP neurons to remove, in [0, 1); got {self.level!r}.")
        if self.kind == "noise" and not self.level >= 0:
            raise ValueError(f"noise needs a non-negative relative standard deviation; got {self.level!r}.")
        if self.then is not None and (self.kind != "mlp" or self.then.kind == "mlp" or self.then.then is not None):
            raise ValueError(f"A combined compression is mlp:F followed by one other compression (e.g. "
                             f"'mlp:0.5+int8'); got {self.spec!r}.")

    @classmethod
    def parse(cls, text: str) -> "Compression":
        """'rtn:4', 'int8', 'int8_dynamic', 'int4', 'prune:0.9', 'mlp:0.5', 'noise:0.1', or 'mlp:F+OTHER'."""
        first, plus, rest = text.strip().partition("+")
        kind, _, level = first.strip().partition(":")
        try:
            value = float(level) if level else None
        except ValueError:
            raise ValueError(f"Cannot read the level of compression {text!r}.") from None
        if plus and not rest.strip():
            raise ValueError(f"Nothing follows '+' in compression {text!r}.")
        return cls(kind, value, cls.parse(rest) if plus else None)

    @property
    def spec(self) -> str:
        """The text `parse` reads back: 'mlp:0.5+int8'."""
        own = self.kind if self.level is None else f"{self.kind}:{self.level:g}"
        return own + (f"+{self.then.spec}" if self.then is not None else "")

    @property
    def name(self) -> str:
        """The key of its accuracy in a report: weights_4bit, int8, int8_dynamic, int4, pruned_90, mlp_0.5,
        noise_0.1, mlp_0.5+int8."""
        if self.kind == "rtn":
            own = f"weights_{int(self.level)}bit"
        elif self.kind == "prune":
            own = f"pruned_{100 * self.level:g}"
        elif self.kind in ("noise", "mlp"):
            own = f"{self.kind}_{self.level:g}"
        else:
            own = self.kind
        return own + (f"+{self.then.name}" if self.then is not None else "")

    @property
    def description(self) -> str:
        if self.kind == "rtn":
            own = f"{int(self.level)}-bit weights (round-to-nearest, per channel)"
        elif self.kind == "prune":
            own = f"{100 * self.level:g}% of weights pruned (global magnitude)"
        elif self.kind == "noise":
            own = f"Gaussian weight noise, {self.level:g} x rms"
        elif self.kind == "mlp":
            own = f"{100 * self.level:g}% of the MLP neurons removed (a smaller model)"
        elif self.kind == "int8":
            own = "int8 weights (torchao, weight-only)"
        elif self.kind == "int8_dynamic":
            own = "int8 weights and activations (torchao, dynamic)"
        else:
            own = f"4-bit weights (torchao, groups of {INT4_GROUP_SIZE})"
        return own + (f", then {self.then.description}" if self.then is not None else "")

    @property
    def deployable(self) -> bool:
        """Whether the compressed model is stored smaller (`export` writes only these)."""
        return self.kind in self.DEPLOYABLE and (self.then is None or self.then.deployable)

    @property
    def random(self) -> bool:
        """Whether it draws random numbers (weight noise)."""
        return self.kind == "noise" or (self.then is not None and self.then.random)

    def apply(self, model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
        """A compressed deep copy of `model` in evaluation mode; `model` itself is left as it was."""
        if is_quantized(_unwrap(model)):
            raise ValueError(f"{type(_unwrap(model)).__name__} is already quantized; compress the float model.")
        return self.apply_in_place(copy.deepcopy(_unwrap(model)).eval(), generator)

    def apply_in_place(self, model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
        """Compress `model` itself; returns the compressed model."""
        if self.kind == "rtn":
            model = quantize_weights_rtn(model, int(self.level))
        elif self.kind == "prune":
            model = prune_global_magnitude(model, self.level)
        elif self.kind == "noise":
            model = add_weight_noise(model, self.level, generator or torch.Generator().manual_seed(0))
        elif self.kind == "mlp":
            model = shrink_mlp(model, self.level)
        else:
            model = {"int8": quantize_int8_weights, "int8_dynamic": quantize_dynamic_int8,
                     "int4": quantize_int4_weights}[self.kind](model)
        return self.then.apply_in_place(model, generator) if self.then is not None else model


_EXAMPLE = {"rtn": "4", "prune": "0.9", "mlp": "0.5", "noise": "0.1"}


def _as_compressions(items: Iterable[Compression | str]) -> list[Compression]:
    return [c if isinstance(c, Compression) else Compression.parse(c) for c in items]


def descriptions(compressions: Sequence[Compression | str] = ()) -> dict[str, str]:
    """`{name in a report: description}` of `compressions` (of `DEFAULT_COMPRESSIONS` when empty)."""
    return {c.name: c.description for c in _as_compressions(compressions or DEFAULT_COMPRESSIONS)}


DEFAULT_COMPRESSIONS: tuple[Compression, ...] = (
    Compression("rtn", 8), Compression("rtn", 4), Compression("rtn", 3), Compression("rtn", 2),
    Compression("prune", 0.5), Compression("prune", 0.7), Compression("prune", 0.9),
    Compression("noise", 0.1), Compression("noise", 0.2),
)
"""What `compression_report` measures unless told otherwise: the compressions that need only torch and apply to
any model with Linear or Conv layers. They show how much the weights tolerate; none of them shrinks a file."""

DEPLOYABLE_COMPRESSIONS: tuple[Compression, ...] = (
    Compression("int8"), Compression("int8_dynamic"), Compression("int4"),
    Compression("mlp", 0.25), Compression("mlp", 0.5), Compression("mlp", 0.5, Compression("int8")),
)
"""The formats `export` writes as smaller models (the integer ones need torchao; `mlp:F` a ViT-style model)."""


# --------------------------------------------------------------------------------------------------
# Measuring


def _unwrap(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        if type(parameter.data).__name__ == "DTensor":
            raise NotImplementedError("Compression needs full (unsharded) parameters; FSDP is not supported.")
    return unwrap_wrappers(model)  # DDP / DataParallel


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output[0]


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], label_key: str = "labels") -> float:
    """Top-1 accuracy of `model` (in evaluation mode) over `batches`: dicts of model inputs plus `label_key`.

    Labels of -100 (padding) are not counted. The inputs are moved to the model's device.
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    correct = total = 0
    try:
        for batch in batches:
            inputs = to_device(dict(batch), device)
            labels = inputs.pop(label_key)
            predictions = _logits(model(**inputs)).argmax(dim=-1)
            keep = labels != -100
            correct += int((predictions[keep] == labels[keep]).sum())
            total += int(keep.sum())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("No labelled example to measure accuracy on.")
    return correct / total


def compression_report(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
    compressions: Sequence[Compression | str] = DEFAULT_COMPRESSIONS,
    evaluate: Callable[[nn.Module], float] | None = None,
    noise_draws: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of `model` before and after each compression: `{"baseline": ..., "weights_4bit": ..., ...}`.

    `batches` is a list of input dicts with `labels` (measured with `accuracy`), or `evaluate(model) -> float` is any
    score of a model (higher is better). Each compression works on its own deep copy: `model`'s parameters,
    buffers, gradients and training mode are left as they were, and the global random state is not used (weight
    noise draws from a generator seeded with `seed`; its value is the mean over `noise_draws` draws).
    """
    if (batches is None) == (evaluate is None):
        raise ValueError("Pass either `batches` (labelled input dicts) or `evaluate` (a function of the model).")
    if evaluate is None:
        batches = list(batches)

        def evaluate(m: nn.Module) -> float:
            return accuracy(m, batches)

    compressions = _as_compressions(compressions)
    report = {"baseline": evaluate(_unwrap(model))}
    for compression in compressions:
        if compression.random:
            generator = torch.Generator().manual_seed(seed)
            scores = [evaluate(compression.apply(model, generator)) for _ in range(noise_draws)]
            report[compression.name] = sum(scores) / len(scores)
        else:
            report[compression.name] = evaluate(compression.apply(model))
    return report


def format_table(reports: Mapping[str, Mapping[str, float]], compressions: Sequence[Compression | str] = ()) -> str:
    """A Markdown table "Accuracy after compression": one row per measurement, one column per run in `reports`."""
    named = descriptions(compressions)
    names = list(dict.fromkeys(key for report in reports.values() for key in report))
    lines = ["| | " + " | ".join(reports) + " |", "|---|" + "---|" * len(reports)]
    for key in names:
        label = "no compression" if key == "baseline" else named.get(key, key)
        cells = [f"{report[key]:.4f}" if key in report and not math.isnan(report[key]) else "" for report in reports.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_over_ranks(model: nn.Module, batches, compressions: Sequence[Compression | str] = DEFAULT_COMPRESSIONS,
                      **kwargs) -> dict[str, float]:
    """`compression_report` on this process's `batches` (one labelled batch or a list of them), averaged over the
    ranks of `torch.distributed` when it is initialised (every rank measures its own examples)."""
    report = compression_report(model, as_batches(batches), compressions, **kwargs)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return report
    values = torch.tensor(list(report.values()), dtype=torch.float64, device=_model_device(_unwrap(model)))
    torch.distributed.all_reduce(values)
    values /= torch.distributed.get_world_size()
    return dict(zip(report, values.tolist()))


# --------------------------------------------------------------------------------------------------
# Trainer callback


class CompressionCallback(BoundCallback):
    """Log the accuracy after each compression as `compression/<name>` (and `compression/baseline`).

    `at="train_end"` (default) measures once, when training ends; `at="evaluate"` at every evaluation. The examples
    are `batch` (one labelled batch or a list of them) if given, else the first `num_examples` examples of the
    evaluation dataloader (per process; under data parallel the accuracies are averaged over ranks), taken once.
    Every compression works on a copy: training goes on with bit-identical weights and random state.

    Logging through the Trainer (console, TensorBoard, `state.log_history`) needs the trainer: use
    `CompressionCallback.attach(trainer, ...)`. The reports are also kept in `callback.reports` as
    `(global_step, report)` pairs.
    """

    def __init__(self, batch=None, num_examples: int | None = 512, at: str = "train_end",
                 compressions: Sequence[Compression | str] = DEFAULT_COMPRESSIONS, noise_draws: int = 3, seed: int = 0,
                 prefix: str = "compression/"):
        if at not in ("train_end", "evaluate"):
            raise ValueError(f"`at` must be 'train_end' or 'evaluate'; got {at!r}.")
        self.batch = batch
        self.num_examples = num_examples
        self.at = at
        self.compressions = _as_compressions(compressions)
        self.noise_draws = noise_draws
        self.seed = seed
        self.prefix = prefix
        self.reports: list[tuple[int, dict[str, float]]] = []

    def measure(self, model: nn.Module) -> dict[str, float]:
        """The report of `model` on the callback's examples, with the prefix, averaged over ranks."""
        report = report_over_ranks(model, self.batch, self.compressions, noise_draws=self.noise_draws, seed=self.seed)
        return {f"{self.prefix}{name}": value for name, value in report.items()}

    def _examples(self, eval_dataloader) -> None:
        if self.batch is None:
            if eval_dataloader is None and self.trainer is not None and self.trainer.eval_dataset is not None:
                eval_dataloader = self.trainer.get_eval_dataloader()
            if eval_dataloader is None:
                raise ValueError("CompressionCallback needs `batch=`, an evaluation dataset, or `attach(trainer)`.")
            self.batch = take_examples(eval_dataloader, self.num_examples, type(self).__name__)

    def _log(self, model, state, metrics=None) -> None:
        logs = self.measure(model)
        self.reports.append((state.global_step, logs))
        self.publish(logs, state, metrics)

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, metrics=None, **kwargs):
        if self.at == "evaluate":
            self._examples(eval_dataloader)
            self._log(model, state, metrics)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.at == "train_end":
            self._examples(None)
            self._log(model, state)
        return control


from .exports import REPORT_NAME, check_exportable, export, recover_with_trainer, variant_name, weights_size  # noqa: E402  (uses the above)
