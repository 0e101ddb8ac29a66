"""Flatness of a trained model: top Hessian eigenvalue, Hessian trace and first-order flatness.

All three are measured on a fixed set of examples, at the current parameters, with the model in evaluation mode
(no dropout; BatchNorm uses its running statistics), so two measurements of the same weights agree.

* `top_hessian_eigenvalue`: power iteration on Hessian-vector products (double back-propagation).
  It returns the eigenvalue of largest magnitude, which near a minimum is the top one.
* `hessian_trace`: Hutchinson's estimator, mean of v^T H v over Rademacher vectors v.
* `first_order_flatness`: the largest gradient norm found inside the ball of radius rho around the
  parameters by a few normalized, projected ascent steps on ||grad L||. GAM (Zhang et al., CVPR 2023)
  defines first-order flatness as R1 = rho * max_{||e|| <= rho} ||grad L(theta + e)||; we report both the
  maximum norm and R1. Near a minimum R1 ~ rho^2 * lambda_max.

The maths is written over lists of tensors (one per trainable parameter). The loss is a closure that
recomputes the scalar loss, or a list of `(weight, closure)` terms whose weighted sum is the loss: the
examples split into chunks, each term the mean loss of one chunk weighted by its share of the examples.
With several terms every gradient and Hessian-vector product runs the chunks one after the other and frees
each chunk's graph before the next, so peak memory is that of one chunk's double back-propagation, however
many examples there are; one term keeps its graph across products instead.

Data parallel: when `torch.distributed` is initialised, every rank measures on its own examples with the
unwrapped model and the Hessian-vector products, gradients and scalars are averaged over ranks (all-reduce).
The random vectors come from a generator seeded identically on every rank, so all ranks follow the same
iterates and measure the Hessian of the mean loss over the union of their examples.

`FlatnessCallback` logs the three metrics at evaluation time through a `transformers.Trainer`, and
`python -m hf_gam.flatness CHECKPOINT_DIR` measures a saved image-classification checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

Tensors = list[torch.Tensor]

__all__ = [
    "FlatnessCallback",
    "as_batches",
    "batch_size",
    "checkpoint_examples",
    "chunked_loss_terms",
    "digits_examples",
    "first_order_flatness",
    "hessian_trace",
    "hvp",
    "measure_flatness",
    "model_loss_fn",
    "slice_batch",
    "take_examples",
    "top_hessian_eigenvalue",
]


# --------------------------------------------------------------------------------------------------
# Vector helpers over lists of tensors (accumulated in float64)


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    total = torch.zeros((), dtype=torch.float64, device=xs[0].device)
    for x, y in zip(xs, ys):
        total += torch.sum(x.double() * y.double())
    return float(total)


def _norm(xs: Sequence[torch.Tensor]) -> float:
    return math.sqrt(max(_dot(xs, xs), 0.0))


def _scale(xs: Sequence[torch.Tensor], c: float) -> Tensors:
    return [x * c for x in xs]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _mean_over_ranks(xs: Sequence[torch.Tensor]) -> Tensors:
    """Average a list of tensors over data-parallel ranks (no-op in one process)."""
    if not _distributed():
        return list(xs)
    world = torch.distributed.get_world_size()
    flat = torch.cat([x.reshape(-1) for x in xs])
    torch.distributed.all_reduce(flat)
    flat /= world
    out, offset = [], 0
    for x in xs:
        out.append(flat[offset : offset + x.numel()].view_as(x))
        offset += x.numel()
    return out


def _mean_scalar_over_ranks(value: float, device) -> float:
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t) / torch.distributed.get_world_size()


def _random_like(params: Sequence[torch.Tensor], generator: torch.Generator, kind: str) -> Tensors:
    """Random vectors drawn on the CPU with `generator` (same on every rank), moved to each parameter."""
    out = []
    for p in params:
        if kind == "normal":
            v = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        else:  # Rademacher
            v = torch.randint(0, 2, p.shape, generator=generator).to(torch.float32) * 2 - 1
        out.append(v.to(device=p.device, dtype=p.dtype))
    return out


# --------------------------------------------------------------------------------------------------
# Gradients and Hessian-vector products


LossTerms = list[tuple[float, Callable[[], torch.Tensor]]]
Loss = Callable[[], torch.Tensor] | LossTerms


def _terms(loss_fn: Loss) -> LossTerms:
    """A loss closure or a list of `(weight, closure)` terms, as a list of terms."""
    return [(1.0, loss_fn)] if callable(loss_fn) else list(loss_fn)


def gradients(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], create_graph: bool = False):
    """Return (loss, [dL/dp]) with zeros for parameters the loss does not reach."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return loss, grads


def hvp(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]) -> Tensors:
    """Hessian-vector product H v, given `grads` computed with `create_graph=True` (the graph is kept)."""
    hv = torch.autograd.grad(grads, params, grad_outputs=list(vectors), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def _add_scaled(total: Tensors | None, xs: Sequence[torch.Tensor], weight: float) -> Tensors:
    """total + weight * xs (in place on total; a new list when total is None)."""
    if total is None:
        return [weight * x for x in xs]
    for t, x in zip(total, xs):
        t.add_(x, alpha=weight)
    return total


class _Curvature:
    """Loss, gradient and Hessian-vector products of L = sum_c w_c L_c at the current parameter values.

    One term keeps its graph (built with `create_graph=True`) and reuses it for every product. Several terms run
    each chunk's forward, backward and double backward in turn and free its graph before the next chunk.
    """

    def __init__(self, loss_fn: Loss, params: Sequence[torch.Tensor]):
        self.terms = _terms(loss_fn)
        self.params = list(params)
        self._kept = None  # (weight, gradients with their graph) of a single term

    def loss(self) -> float:
        with torch.no_grad():
            return sum(w * float(fn()) for w, fn in self.terms)

    def gradient(self, keep_graph: bool = False) -> Tensors:
        """dL/dp (detached). With a single term and `keep_graph`, its graph stays for the next `hvp` calls."""
        if len(self.terms) == 1:
            weight, fn = self.terms[0]
            _, grads = gradients(fn, self.params, create_graph=keep_graph)
            if keep_graph:
                self._kept = (weight, grads)
            return [weight * g.detach() for g in grads]
        total = None
        for weight, fn in self.terms:
            _, grads = gradients(fn, self.params)
            total = _add_scaled(total, grads, weight)
        return total

    def hvp(self, vectors: Sequence[torch.Tensor]) -> Tensors:
        """H v for the Hessian H of L."""
        if len(self.terms) == 1:
            if self._kept is None:
                self.gradient(keep_graph=True)
            weight, grads = self._kept
            return _scale(hvp(grads, self.params, vectors), weight)
        total = None
        for weight, fn in self.terms:
            _, grads = gradients(fn, self.params, create_graph=True)
            total = _add_scaled(total, hvp(grads, self.params, vectors), weight)
            del grads  # this chunk's graph goes before the next chunk's is built
        return total


def top_hessian_eigenvalue(
    loss_fn: Loss,
    params: Sequence[torch.Tensor],
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Power iteration on H: the eigenvalue of largest magnitude and the iterations used.

    Stops when the Rayleigh quotient changes by less than `tol` relative to its magnitude, or after `iters`.
    """
    params = list(params)
    generator = torch.Generator().manual_seed(seed)
    curvature = _Curvature(loss_fn, params)
    v = _random_like(params, generator, "normal")
    v = _scale(v, 1.0 / (_norm(v) + 1e-30))
    eig = None
    done = 0
    for done in range(1, iters + 1):
        hv = _mean_over_ranks(curvature.hvp(v))
        new_eig = _dot(v, hv)
        norm_hv = _norm(hv)
        if norm_hv == 0.0:
            eig = 0.0
            break
        v = _scale(hv, 1.0 / norm_hv)
        if eig is not None and abs(new_eig - eig) <= tol * (abs(eig) + 1e-12):
            eig = new_eig
            break
        eig = new_eig
    return {"top_eigenvalue": eig, "iterations": done}


def hessian_trace(
    loss_fn: Loss,
    params: Sequence[torch.Tensor],
    samples: int = 20,
    seed: int = 0,
) -> dict:
    """Hutchinson's estimate of tr(H): mean of v^T H v over Rademacher vectors, with its standard error."""
    params = list(params)
    generator = torch.Generator().manual_seed(seed + 1)
    curvature = _Curvature(loss_fn, params)
    values = []
    for _ in range(samples):
        v = _random_like(params, generator, "rademacher")
        values.append(_dot(v, _mean_over_ranks(curvature.hvp(v))))
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / max(len(values) - 1, 1)
    return {"trace": mean, "trace_stderr": math.sqrt(var / len(values))}


def first_order_flatness(
    loss_fn: Loss,
    params: Sequence[torch.Tensor],
    rho: float = 0.05,
    steps: int = 3,
) -> dict:
    """Largest gradient norm found in the ball ||e|| <= rho by `steps` normalized, projected ascent steps.

    Each step moves e by rho along u / ||u||, u = grad_e ||grad L(theta + e)|| (a Hessian-vector product),
    then projects e back onto the ball. The parameters are restored exactly (copied back) afterwards.
    Returns the gradient norm at theta, the maximum found, and R1 = rho * max.
    """
    params = list(params)
    saved = [p.detach().clone() for p in params]
    e = [torch.zeros_like(p) for p in params]
    best = 0.0
    grad_norm0 = None
    try:
        for step in range(steps + 1):
            with torch.no_grad():
                for p, s, d in zip(params, saved, e):
                    p.copy_(s + d)
            curvature = _Curvature(loss_fn, params)  # at theta + e
            grads_mean = _mean_over_ranks(curvature.gradient(keep_graph=step < steps))
            norm = _norm(grads_mean)
            if grad_norm0 is None:
                grad_norm0 = norm
            best = max(best, norm)
            if step == steps or norm == 0.0:
                break
            # d||g|| / dtheta = H g / ||g||, with g the rank-averaged gradient and H averaged over ranks.
            u = _mean_over_ranks(curvature.hvp(_scale(grads_mean, 1.0 / norm)))
            norm_u = _norm(u)
            if norm_u == 0.0:
                break
            e = [d + (rho / norm_u) * x for d, x in zip(e, u)]
            norm_e = _norm(e)
            if norm_e > rho:
                e = _scale(e, rho / norm_e)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return {"grad_norm": grad_norm0, "max_grad_norm": best, "first_order_flatness": rho * best}


# --------------------------------------------------------------------------------------------------
# Models


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
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
    batch = _to_device(batch, device)
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


def chunked_loss_terms(model: torch.nn.Module, batches, chunk_size: int | None = None,
                       loss: Callable | None = None) -> LossTerms:
    """`(weight, closure)` terms whose weighted sum is the mean loss over all examples of `batches`.

    `batches` is one batch or a list of batches; each is split into chunks of at most `chunk_size` examples (None:
    one chunk per batch). A closure computes the loss of one chunk (the model's mean over its examples) and its
    weight is the chunk's share of all examples, so the terms sum to the mean loss over all of them.
    """
    chunks = []
    for batch in as_batches(batches):
        n = batch_size(batch)
        step = n if chunk_size is None else chunk_size
        if step < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
        chunks += [slice_batch(batch, start, min(start + step, n)) for start in range(0, n, step)]
    total = sum(batch_size(c) for c in chunks)
    if len(chunks) == 1:
        return [(1.0, model_loss_fn(model, chunks[0], loss))]
    return [(batch_size(c) / total, model_loss_fn(model, c, loss)) for c in chunks]


@contextlib.contextmanager
def _measurement_mode(model: torch.nn.Module):
    """Evaluation mode and the math attention kernel (fused kernels lack double backward); restored after."""
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


def measure_flatness(
    model: torch.nn.Module,
    batch,
    loss: Callable | None = None,
    eig_iters: int = 20,
    trace_samples: int = 20,
    rho: float = 0.05,
    ascent_steps: int = 3,
    seed: int = 0,
    metrics: Sequence[str] = ("eigenvalue", "trace", "first_order"),
    chunk_size: int | None = None,
    eig_tol: float = 1e-3,
) -> dict:
    """Measure the chosen metrics of `model` on the examples of `batch`; returns a flat dict of floats.

    `batch` is one batch or a list of batches; all their examples together define the loss (their mean). With
    `chunk_size`, every gradient and Hessian-vector product runs over chunks of at most that many examples, so
    peak memory is that of one chunk; the result is the same as in one batch (up to rounding). `loss(model, batch)`
    must return the mean loss over the batch's examples (default: the model's own loss).

    `model` may be wrapped (DDP); its inner module is used. Under `torch.distributed`, call it on every rank
    with that rank's examples: results are the same on all ranks.
    """
    model = _unwrap(model)
    for p in model.parameters():
        if type(p.data).__name__ == "DTensor":
            raise NotImplementedError("Flatness metrics need full (unsharded) parameters; FSDP is not supported.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters.")
    terms = chunked_loss_terms(model, batch, chunk_size, loss)
    out = {}
    with _measurement_mode(model):
        out["loss"] = _mean_scalar_over_ranks(_Curvature(terms, params).loss(), params[0].device)
        if "eigenvalue" in metrics:
            r = top_hessian_eigenvalue(terms, params, iters=eig_iters, tol=eig_tol, seed=seed)
            out["top_eigenvalue"] = r["top_eigenvalue"]
        if "trace" in metrics:
            out.update(hessian_trace(terms, params, samples=trace_samples, seed=seed))
        if "first_order" in metrics:
            out.update(first_order_flatness(terms, params, rho=rho, steps=ascent_steps))
    return out


# --------------------------------------------------------------------------------------------------
# Trainer callback

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object


def take_examples(dataloader, num_examples: int | None, owner: str) -> list:
    """The first `num_examples` examples of `dataloader` (all of them if `None`), as a list of batches kept on the
    CPU; a warning names `owner` when the dataloader has fewer."""
    batches, count = [], 0
    for batch in dataloader:
        n = batch_size(batch)
        if num_examples is not None:
            n = min(n, num_examples - count)
            batch = slice_batch(batch, 0, n)
        batches.append(_to_device(batch, "cpu"))
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


class FlatnessCallback(BoundCallback):
    """Measure flatness at every evaluation and log it with the Trainer's logs as `flatness/*`.

    The examples are `batch` if given, else the first `num_examples` examples of the evaluation dataloader,
    gathered over as many of its batches as needed (all of them, with a warning, when it has fewer examples; each
    rank keeps its own under data parallel) and frozen at the first evaluation. Gradients and Hessian-vector
    products run over chunks of at most `chunk_size` examples, so peak memory is that of one chunk's double
    backward whatever `num_examples` is; the metrics are those of the mean loss over all the examples. The number
    of examples is logged as `flatness/num_examples`.

    Logging through the Trainer (console, TensorBoard, W&B, `state.log_history`) needs the trainer:
    use `FlatnessCallback.attach(trainer, ...)` or `callback.bind(trainer)`. Without it, the metrics are
    still added to the dict `trainer.evaluate()` returns and appended to `state.log_history`.
    """

    def __init__(self, batch=None, num_examples: int | None = 256, chunk_size: int | None = 16,
                 prefix: str = "flatness/", **measure_kwargs):
        """`measure_kwargs` go to `measure_flatness` (loss, eig_iters, eig_tol, trace_samples, rho, ascent_steps,
        seed, metrics) and keep its defaults. `num_examples=None` takes the whole evaluation set."""
        self.batch = batch
        self.num_examples = num_examples
        self.chunk_size = chunk_size
        self.kwargs = measure_kwargs
        self.prefix = prefix

    def measure(self, model) -> dict:
        values = measure_flatness(model, self.batch, chunk_size=self.chunk_size, **self.kwargs)
        values["num_examples"] = sum(batch_size(b) for b in as_batches(self.batch))
        return {f"{self.prefix}{k}": v for k, v in values.items()}

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, metrics=None, **kwargs):
        if self.batch is None:
            if eval_dataloader is None:
                raise ValueError("FlatnessCallback needs `batch=` or an evaluation dataloader.")
            self.batch = take_examples(eval_dataloader, self.num_examples, "FlatnessCallback")
        self.publish(self.measure(model), state, metrics)
        return control


# --------------------------------------------------------------------------------------------------
# Data for the command line and the benchmarks


def digits_examples(split: str = "test", seed: int = 0) -> list[dict]:
    """scikit-learn's bundled 8x8 digits as `{"pixel_values": (1, 8, 8) float32 tensor, "labels": int}`.

    Fixed split (seed 0): 30% test; of the rest, 20% validation and 80% train. Pixels scaled to [-1, 1].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 8.0 - 1.0
    y = data.target.tolist()
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=0.3, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=0.2, random_state=seed, stratify=[y[i] for i in rest])
    chosen = {"train": train, "validation": val, "test": test}[split]
    return [{"pixel_values": x[i].unsqueeze(0), "labels": int(y[i])} for i in chosen]


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _imagefolder_examples(path: str, model, checkpoint: str | None = None, num_examples: int | None = None,
                          split: str | None = None) -> list[dict]:
    """Labelled images of an imagefolder, `path/<label>/<image>` (or `path/<split>/<label>/<image>` when that folder
    exists). At most `num_examples`, taken from the classes in turn (the first image of each class, then the second,
    ...), so that a bounded sample covers every class. Labels come from the model's `label2id`; a model with the
    default names (`LABEL_0`, ...) takes the sorted folder names in order, and a folder the model does not know is an
    error. Images are prepared by the checkpoint's image processor when it has one, else resized and scaled to
    [-1, 1]."""
    import itertools
    import os

    from PIL import Image

    if split and os.path.isdir(os.path.join(path, split)):
        path = os.path.join(path, split)
    labels = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not labels:
        raise ValueError(f"{path} holds no class folders: an imagefolder is laid out as <dir>/<label>/<image>.")
    label2id = getattr(model.config, "label2id", None) or {}
    default_names = all(str(name).startswith("LABEL_") for name in label2id)
    if default_names:
        num_labels = getattr(model.config, "num_labels", len(labels))
        if len(labels) > num_labels:
            raise ValueError(f"{path} has {len(labels)} class folders; the model has {num_labels} labels.")
        label2id = {name: i for i, name in enumerate(labels)}
    unknown = [name for name in labels if name not in label2id]
    if unknown:
        raise ValueError(f"the model's labels ({sorted(label2id)[:10]}...) do not name the folders {unknown} of {path}.")
    files = [[os.path.join(path, name, f) for f in sorted(os.listdir(os.path.join(path, name)))
              if f.lower().endswith(IMAGE_EXTENSIONS)] for name in labels]
    chosen = [pair for row in itertools.zip_longest(*[[(name, f) for f in fs] for name, fs in zip(labels, files)])
              for pair in row if pair is not None][:num_examples]
    processor = None
    if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "preprocessor_config.json")):
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(checkpoint)
    size = getattr(model.config, "image_size", 224)
    channels = getattr(model.config, "num_channels", 3)
    examples = []
    for name, file in chosen:
        img = Image.open(file).convert("L" if channels == 1 else "RGB")
        if processor is not None:
            x = processor(img, return_tensors="pt")["pixel_values"][0]
        else:
            img = img.resize((size, size))
            pixels = np.asarray(img, dtype=np.float32).reshape(size, size, channels)
            x = torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0
        examples.append({"pixel_values": x, "labels": int(label2id[name])})
    if not examples:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {path}.")
    return examples


def checkpoint_examples(checkpoint: str, model, data: str, split: str, num_examples: int) -> dict:
    """One batch of at most `num_examples` labelled examples for measuring the checkpoint `model` was loaded from:
    `data="digits"`, the bundled digits' `split` (scaled to [-1, 1], repeated over the model's channels), or an
    imagefolder path (see `_imagefolder_examples`)."""
    if data == "digits":
        examples = digits_examples(split)[:num_examples]
        channels = getattr(model.config, "num_channels", 1)
        examples = [{**e, "pixel_values": e["pixel_values"].expand(channels, -1, -1)} for e in examples]
    else:
        examples = _imagefolder_examples(data, model, checkpoint, num_examples, split)
    return _stack(examples)


def add_checkpoint_arguments(parser: argparse.ArgumentParser, split: str, num_examples: int) -> None:
    """The command-line arguments naming a saved checkpoint and the labelled examples to measure it on, as
    `load_checkpoint` reads them."""
    parser.add_argument("checkpoint", help="directory written by save_pretrained / a Trainer checkpoint")
    parser.add_argument("--data", default="digits",
                        help="'digits' (scikit-learn, bundled) or an imagefolder path (<dir>/<class>/<image>): at most "
                        "--num-examples images, taken from the classes in turn")
    parser.add_argument("--split", default=split, help="digits split (train, validation or test); for an "
                        "imagefolder, the subfolder <dir>/<split> when there is one")
    parser.add_argument("--num-examples", type=int, default=num_examples, help="at most this many examples")


def load_checkpoint(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The image classifier saved at `args.checkpoint` and one batch of its examples (`checkpoint_examples`)."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(args.checkpoint)
    return model, checkpoint_examples(args.checkpoint, model, args.data, args.split, args.num_examples)


def _stack(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


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
