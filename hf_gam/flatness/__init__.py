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

import math
from collections.abc import Callable, Sequence

import torch

from ..measuring import (  # noqa: F401  (batch helpers, also importable from here as before)
    BoundCallback, as_batches, batch_size, default_loss, measurement_mode, model_loss_fn, slice_batch, take_examples,
    unwrap,
)

Tensors = list[torch.Tensor]

__all__ = [
    "FlatnessCallback",
    "as_batches",
    "batch_size",
    "chunked_loss_terms",
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
    model = unwrap(model)
    for p in model.parameters():
        if type(p.data).__name__ == "DTensor":
            raise NotImplementedError("Flatness metrics need full (unsharded) parameters; FSDP is not supported.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters.")
    terms = chunked_loss_terms(model, batch, chunk_size, loss)
    out = {}
    with measurement_mode(model):
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
