"""Helpers shared by the measurements (`hf_gam.flatness`, `hf_gam.compression`, `hf_gam.landscape`): batches of
examples as dicts or tuples of tensors, moving them to a device, unwrapping DDP, the measurement mode, gathering a
bounded number of evaluation examples, and the base of the measuring callbacks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

__all__ = [
    "BoundCallback",
    "as_batches",
    "batch_size",
    "default_loss",
    "measurement_mode",
    "model_loss_fn",
    "slice_batch",
    "stack_examples",
    "take_examples",
    "to_device",
    "unwrap",
]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel wrappers (`.module`, repeatedly)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def to_device(batch, device):
    """`batch` (a tensor, or dicts, lists and tuples of them) with every tensor moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def default_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """The loss a `Trainer` would use: `model(**batch)` with labels in the batch, then `.loss` (or output[0])."""
    outputs = model(**batch) if isinstance(batch, Mapping) else model(*batch)
    if isinstance(outputs, Mapping) or hasattr(outputs, "loss"):
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs.loss
        if loss is not None:
            return loss
    return outputs[0]


def model_loss_fn(model: torch.nn.Module, batch, loss: Callable | None = None) -> Callable[[], torch.Tensor]:
    """A closure recomputing the loss of `model` on `batch` (moved to the model's device)."""
    loss = loss or default_loss
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    return lambda: loss(model, dict(batch) if isinstance(batch, Mapping) else batch)


def _batch_items(batch) -> list:
    return list(batch.values()) if isinstance(batch, Mapping) else list(batch)


def batch_size(batch) -> int:
    """The number of examples in `batch`: the leading size of its first tensor with at least one dimension."""
    for value in _batch_items(batch):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("The batch holds no tensor with a batch dimension.")


def slice_batch(batch, start: int, stop: int):
    """Examples `start:stop` of `batch`: every tensor whose leading size is the batch size is sliced."""
    n = batch_size(batch)

    def cut(value):
        return value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n else value

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(v) for v in batch)


def as_batches(batches) -> list:
    """One batch or a list of batches (dicts, tuples or lists of tensors), as a list of batches."""
    if isinstance(batches, list) and batches and not isinstance(batches[0], torch.Tensor):
        return list(batches)
    return [batches]


@contextlib.contextmanager
def measurement_mode(model: torch.nn.Module):
    """Evaluation mode, gradients on, and the math attention kernel (fused kernels lack double backward); restored after."""
    was_training = model.training
    model.eval()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # older torch
        kernel = contextlib.nullcontext()
    try:
        with kernel, torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def stack_examples(examples: list[dict]) -> dict:
    """`{"pixel_values": (N, ...) tensor, "labels": (N,) tensor}` from a list of `{"pixel_values", "labels"}` rows."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


def take_examples(dataloader, num_examples: int | None, owner: str) -> list:
    """The first `num_examples` examples of `dataloader` (all of them if `None`), as a list of batches kept on the
    CPU; a warning names `owner` when the dataloader has fewer."""
    batches, count = [], 0
    for batch in dataloader:
        n = batch_size(batch)
        if num_examples is not None:
            n = min(n, num_examples - count)
            batch = slice_batch(batch, 0, n)
        batches.append(to_device(batch, "cpu"))
        count += n
        if num_examples is not None and count >= num_examples:
            break
    if count == 0:
        raise ValueError(f"{owner}: the evaluation dataloader gave no examples.")
    if num_examples is not None and count < num_examples:
        logger.warning(
            f"{owner}: the evaluation set has {count} examples (on this process), fewer than "
            f"num_examples={num_examples}; measuring on those {count}."
        )
    return batches


class BoundCallback(TrainerCallback):
    """A callback that logs what it measures through the trainer it is bound to (`attach` or `bind`); unbound, it
    appends its logs to `state.log_history`."""

    trainer = None

    @classmethod
    def attach(cls, trainer, **kwargs):
        """Create a callback, bind it to `trainer` and add it to the trainer's callbacks."""
        callback = cls(**kwargs)
        callback.bind(trainer)
        trainer.add_callback(callback)
        return callback

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def publish(self, logs: dict, state, metrics: dict | None = None) -> None:
        """Add `logs` to the evaluation's `metrics` (if any) and log them."""
        if metrics is not None:
            metrics.update(logs)
        if self.trainer is not None:
            self.trainer.log(dict(logs))
        else:
            state.log_history.append({**logs, "epoch": state.epoch, "step": state.global_step})
