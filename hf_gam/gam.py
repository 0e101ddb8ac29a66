"""GAM's update (accelerated GAM, Algorithm 2 of Zhang et al., CVPR 2023) over lists of tensors.

Nothing here knows about `transformers`: `GAMStep.run` receives the micro-batch's `StepInputs`, whose
`forward_backward(pass_index)` callable leaves the gradient of one pass in `p.grad`, and it leaves the GAM direction
`d` in `p.grad` with the parameters back at theta, bit for bit. In the symbols of the paper:

    g0 = grad L(theta)
    g1 = grad L(theta + rho' g0 / ||g0||)                  h0 = g1 - g0
    g2 = grad L(theta2),  theta2 = theta + rho h0 / ||h0||
    g3 = grad L(theta2 + rho' g2 / ||g2||)
    h+ = alpha g1 + (1 - alpha) g3
    h- = g0 + (1 - beta) g2          ("released")  or  beta g0 + (1 - beta) g2  ("paper")
    d  = h+ - gamma (h- - <h-, h+> / ||h+||^2 h+)

Work memory: three parameter-sized buffers (theta, h-, alpha * g1), allocated on first use and reused, and a
fourth (the stored correction) for the cheaper modes: reuse steps and passes on part of the micro-batch.
The parameters themselves serve as scratch space for h0 while they do not hold theta.
"""

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # FSDP2 shards parameters and gradients as DTensors: the maths runs on the local shards.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()

# Sums a 0-dim tensor over the processes that hold other parts of the same vector (shards or ranks).
ReduceFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class GAMHyperParams:
    """The hyper-parameters of one GAM step (symbols as in the module docstring)."""

    method: str = "gam"  # "gam" or "sam"
    grad_rho: float = 0.02  # rho'
    grad_norm_rho: float = 0.2  # rho
    alpha: float = 0.6
    beta: float = 0.5
    gamma: float = 0.03
    formula: str = "released"  # "released" or "paper"
    adaptive: bool = False
    eps: float = 1e-12  # xi
    # Reuse steps: add only the part of the stored correction orthogonal to the current gradient (see `_reuse_pass`).
    reuse_orthogonal: bool = False
    # "gradient": the passes described above. "momentum" (SAM only): one pass, at theta - rho' m / (||m|| + xi) with
    # m the optimizer's momentum (`StepInputs.momentum`), whose gradient is d (see `_momentum_pass`).
    perturbation: str = "gradient"


@dataclass(frozen=True)
class DataParallel:
    """How the ranks of a data-parallel (DDP) run combine their gradients.

    mode "local": every rank runs the passes on its own shard of the batch; the accumulated gradient is averaged
    once, when `sync_now` says this micro-batch ends the optimizer step. mode "global": the gradient of every pass
    is averaged before it is used, so a step equals one-process GAM on the global batch.
    """

    mode: str = "local"
    sync_now: bool = True
    group: Optional[object] = None  # a torch.distributed process group; None means the default group


@dataclass
class GAMStats:
    """What one micro-batch's passes measured. Every value stays a 0-dim device tensor (reading one would make the
    host wait for the device); `grad_norm` and `flatness` are in the units of the gradients the passes left (loss
    scale and accumulation normalisation included)."""

    loss: Tensor  # loss at theta (pass 1), as the stock training step returns it
    grad_norm: Optional[Tensor] = None  # ||g0||
    flatness: Optional[Tensor] = None  # ||g1 - g0|| / rho' (not measured on a reuse step)
    cos: Optional[Tensor] = None  # cosine of h- and h+ (full GAM only)
    failed: Optional[Tensor] = None  # bool: some pass produced a non-finite gradient
    dropped: bool = False  # the micro-batch's gradient was dropped (non-finite, no loss scaler)
    collectives: int = 0  # gradient all-reduces this micro-batch issued
    passes: int = 0  # forward/backward passes run


@dataclass(frozen=True)
class StepInputs:
    """What `GAMStep.run` needs for one micro-batch, besides the parameters the step was built for.

    `forward_backward(pass_index)` runs one forward and backward pass on the micro-batch, leaves its gradient in
    `p.grad` and returns the loss; it must not synchronise gradients across data-parallel ranks itself (run it under
    DDP's `no_sync`). `hp` holds the radii of this step (any schedule already applied by the caller).
    """

    forward_backward: Callable[[int], Tensor]
    hp: GAMHyperParams = GAMHyperParams()
    norm_modules: Sequence[nn.Module] = ()  # BatchNorm-type layers: only pass 1 moves their running statistics
    same_rng: bool = True  # passes 2-4 get the random state pass 1 started with (same dropout masks)
    reduce: Optional[ReduceFn] = None  # sums partial scalars over the shards of a sharded (FSDP) model
    data_parallel: Optional[DataParallel] = None  # the DDP semantics; None in one process and under FSDP
    # What a non-finite gradient in any pass does. "mark": a loss scaler will skip the step, so a non-finite value is
    # left in the gradient (no host synchronisation). "drop": nothing would skip the step, so the micro-batch
    # contributes nothing (its gradients are dropped).
    nonfinite: str = "mark"
    # Like `forward_backward`, on a part of the micro-batch: GAM's passes run on that part and one pass on the whole
    # micro-batch applies their correction (see `GAMStep._sub_batch_passes`).
    sub_forward_backward: Optional[Callable[[int], Tensor]] = None
    # After pass 1, `run_full(||g0||)` says whether the other passes run; when it returns False, d = g0 (the stock
    # step's gradient, from the one pass already paid for). None: they always run.
    run_full: Optional[Callable[[Tensor], bool]] = None
    # With `hp.perturbation == "momentum"`: the optimizer's momentum of each parameter of the step (None where the
    # optimizer holds none yet), in the order of `GAMStep.params`.
    momentum: Optional[Sequence[Optional[Tensor]]] = None


class GradNormTrigger:
    """When to run the full step: when the squared gradient norm x = ||g0||^2 is high against its running mean and
    variance (AE-SAM's rule, Jiang et al., ICLR 2023), with exponential moving averages of decay delta:

        mu <- delta mu + (1 - delta) x,   var <- delta var + (1 - delta) (x - mu)^2,   full step iff x > mu + k sqrt(var)

    (mu and var start at 0 and are updated with the current x before the comparison). A non-finite x updates
    nothing and runs no full step. Plain floats on the host."""

    def __init__(self, *, k: float, decay: float) -> None:
        self.k, self.decay = k, decay
        self.mean = 0.0
        self.var = 0.0

    def __call__(self, squared_norm: float) -> bool:
        if not math.isfinite(squared_norm):
            return False
        self.mean = self.decay * self.mean + (1.0 - self.decay) * squared_norm
        self.var = self.decay * self.var + (1.0 - self.decay) * (squared_norm - self.mean) ** 2
        return squared_norm > self.mean + self.k * math.sqrt(self.var)


def local_tensor(t: Tensor) -> Tensor:
    """The part of `t` stored on this process: the local shard of a DTensor, `t` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


BUCKET_BYTES = 25 * 2**20  # the bucket size DDP uses by default


def all_reduce_mean_(
    tensors: Sequence[Tensor],
    *,
    group: Optional[object] = None,
    scratch: Optional[dict[tuple, Tensor]] = None,
    bucket_bytes: int = BUCKET_BYTES,
) -> int:
    """Average `tensors` over the ranks of `group`, in place; returns the number of all-reduces issued.

    Tensors of one device and dtype are packed into a flat bucket: `scratch[(device, dtype)]` when it is given and
    large enough (one all-reduce for all of them, no new memory), otherwise buckets of at most `bucket_bytes`.
    """
    world_size = dist.get_world_size(group)
    by_kind: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    calls = 0
    for kind, group_tensors in by_kind.items():
        flat_scratch = (scratch or {}).get(kind)
        total = sum(t.numel() for t in group_tensors)
        if flat_scratch is not None and flat_scratch.numel() >= total:
            chunks = [group_tensors]
        else:
            flat_scratch = None
            chunks = _chunks(group_tensors, max(bucket_bytes // group_tensors[0].element_size(), 1))
        for chunk in chunks:
            sizes = [t.numel() for t in chunk]
            numel = sum(sizes)
            flat = flat_scratch[:numel] if flat_scratch is not None else torch.empty(numel, dtype=kind[1], device=kind[0])
            views = [v.view_as(t) for v, t in zip(flat.split(sizes), chunk)]
            torch._foreach_copy_(views, list(chunk))
            dist.all_reduce(flat, group=group)
            calls += 1
            flat.div_(world_size)
            torch._foreach_copy_(list(chunk), views)
    return calls


def _chunks(tensors: list[Tensor], max_numel: int) -> list[list[Tensor]]:
    """Consecutive runs of `tensors` of at most `max_numel` elements (a larger tensor stands alone)."""
    chunks: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if chunks[-1] and size + t.numel() > max_numel:
            chunks.append([])
            size = 0
        chunks[-1].append(t)
        size += t.numel()
    return chunks


def sharded_sum(params: Sequence[Tensor]) -> ReduceFn:
    """For DTensor parameters sharded by FSDP2: sums a partial scalar over every mesh dimension that shards them
    (replicated dimensions already hold equal values)."""
    first = params[0]
    groups = [first.device_mesh.get_group(dim) for dim, p in enumerate(first.placements) if p.is_shard()]

    def reduce(total: Tensor) -> Tensor:
        for group in groups:
            dist.all_reduce(total, group=group)
        return total

    return reduce


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64, where the device has it (MPS has none: float32 there). A loss-scaled float32 gradient near 1e38 is
    finite, its square is not, and a false overflow would skip a good step."""
    return torch.float32 if device.type == "mps" else torch.float64


def _total(parts: list[Tensor], *, reduce: Optional[ReduceFn]) -> Tensor:
    """The sum of 0-dim `parts` (moved to the first one's device), then summed over shards/ranks by `reduce`."""
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    device = parts[0].device
    total = torch.stack([t.to(device) for t in parts]).sum()
    return reduce(total) if reduce is not None else total


def sum_of_squares(tensors: Sequence[Tensor], *, reduce: Optional[ReduceFn] = None) -> Tensor:
    """sum_i ||t_i||^2, accumulated in float64, then summed by `reduce` (a 0-dim device tensor)."""
    if len(tensors) == 0:
        return _total([], reduce=reduce)
    norms = torch._foreach_norm(tensors, 2, dtype=_accumulation_dtype(tensors[0].device))
    return _total([n.square() for n in norms], reduce=reduce)


def global_norm(tensors: Sequence[Tensor], *, reduce: Optional[ReduceFn] = None) -> Tensor:
    """The L2 norm of the concatenation of `tensors` (over all shards when `reduce` is given), a 0-dim tensor."""
    return sum_of_squares(tensors, reduce=reduce).sqrt()


CHUNK = 2**20  # elements converted to float64 at a time by `global_dot` and `weighted_norm`


def _chunk_pairs(a: Sequence[Tensor], b: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """Matching flat pieces of at most `CHUNK` elements of every pair of tensors, so that their float64 copies stay
    small whatever the size of a tensor."""
    for x, y in zip(a, b):
        x, y = x.reshape(-1), y.reshape(-1)
        for start in range(0, x.numel(), CHUNK):
            yield x[start : start + CHUNK], y[start : start + CHUNK]


def global_dot(a: Sequence[Tensor], b: Sequence[Tensor], *, reduce: Optional[ReduceFn] = None) -> Tensor:
    """<a, b> over all the tensors (and shards), multiplied and accumulated in float64, a chunk at a time."""
    parts = []
    for x, y in _chunk_pairs(a, b):
        dtype = _accumulation_dtype(x.device)
        parts.append(torch.dot(x.to(dtype), y.to(dtype)))
    return _total(parts, reduce=reduce)


def weighted_norm(direction: Sequence[Tensor], weights: Sequence[Tensor], *,
                  reduce: Optional[ReduceFn] = None) -> Tensor:
    """|| direction * |weights| ||, in float64, a chunk at a time (no parameter-sized temporary)."""
    parts = []
    for d, w in _chunk_pairs(direction, weights):
        dtype = _accumulation_dtype(d.device)
        parts.append((d.to(dtype) * w.to(dtype).abs()).square().sum())
    return _total(parts, reduce=reduce).sqrt()


def _by_device(*lists: Sequence[Tensor]) -> dict[torch.device, tuple[list[Tensor], ...]]:
    """The parallel `lists` split by the device of the first list's tensors: device -> one sub-list per list."""
    groups: dict[torch.device, tuple[list[Tensor], ...]] = {}
    for items in zip(*lists):
        group = groups.setdefault(items[0].device, tuple([] for _ in lists))
        for sub, item in zip(group, items):
            sub.append(item)
    return groups


def scale_(tensors: Sequence[Tensor], *, factor: Tensor) -> None:
    """tensors *= factor, in place, with `factor` a 0-dim tensor (no host synchronisation)."""
    for device, (group,) in _by_device(tensors).items():
        torch._foreach_mul_(group, factor.to(device=device, dtype=group[0].dtype))


def add_scaled_(tensors: Sequence[Tensor], others: Sequence[Tensor], *, factor: Tensor) -> None:
    """tensors += factor * others, in place, with `factor` a 0-dim tensor (broadcast views of it: no temporary)."""
    for device, (ts, os_) in _by_device(tensors, others).items():
        scalar = factor.to(device=device, dtype=ts[0].dtype)
        torch._foreach_addcmul_(ts, os_, [scalar.expand_as(o) for o in os_])


def ascend_(
    params: list[Tensor],
    direction: list[Tensor],
    *,
    radius: float,
    eps: float,
    adaptive: bool,
    reduce: Optional[ReduceFn] = None,
    norm: Optional[Tensor] = None,
) -> Tensor:
    """Move `params` by `radius` along `direction`, in place; `direction` is used as scratch (it is left scaled).
    Returns the norm used to normalise (a 0-dim tensor).

    Plain: params += radius * direction / (||direction|| + eps); `norm` is ||direction|| when already known.
    Adaptive: params += radius * direction * params^2 / (||direction * |params| || + eps).
    """
    if not adaptive:
        norm = global_norm(direction, reduce=reduce) if norm is None else norm
        scale_(direction, factor=radius / (norm + eps))
        torch._foreach_add_(params, direction)
        return norm
    norm = weighted_norm(direction, params, reduce=reduce)
    torch._foreach_mul_(direction, params)
    torch._foreach_mul_(direction, params)
    scale_(direction, factor=radius / (norm + eps))
    torch._foreach_add_(params, direction)
    return norm


def ascend_from_(
    params: list[Tensor],
    base: list[Tensor],
    *,
    radius: float,
    eps: float,
    adaptive: bool,
    reduce: Optional[ReduceFn] = None,
) -> Tensor:
    """`params` holds a direction h on entry; on exit it holds base + radius * h / (||h|| + eps)
    (adaptive: base + radius * h * base^2 / (||h * |base| || + eps)). Returns ||h|| (the plain norm)."""
    norm = global_norm(params, reduce=reduce)
    if not adaptive:
        scale_(params, factor=radius / (norm + eps))
        torch._foreach_add_(params, base)
        return norm
    scale = radius / (weighted_norm(params, base, reduce=reduce) + eps)
    torch._foreach_mul_(params, base)
    torch._foreach_mul_(params, base)
    scale_(params, factor=scale)
    torch._foreach_add_(params, base)
    return norm


def remove_orthogonal_part_(
    h_plus: list[Tensor], h_minus: list[Tensor], *, gamma: float, eps: float, reduce: Optional[ReduceFn] = None
) -> tuple[Tensor, Tensor]:
    """h_plus <- h+ - gamma * (h- - c h+), the part of h- orthogonal to h+ removed, in place.

    c = cos * ||h-|| / (||h+|| + eps) with cos = <h-, h+> / (||h+|| ||h-|| + eps), the form of the
    released code. Returns (cos, coefficient applied to h+), 0-dim tensors.
    """
    norm_plus = global_norm(h_plus, reduce=reduce)
    norm_minus = global_norm(h_minus, reduce=reduce)
    cos = global_dot(h_minus, h_plus, reduce=reduce) / (norm_plus * norm_minus + eps)
    factor = 1.0 + gamma * (cos * norm_minus / (norm_plus + eps))
    scale_(h_plus, factor=factor)
    torch._foreach_add_(h_plus, h_minus, alpha=-gamma)
    return cos, factor


def _accelerator_module():
    """The torch module of the current accelerator (torch.cuda, torch.xpu, torch.mps, ...), or None."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or not accelerator.is_available():
        return None
    return torch.get_device_module(accelerator.current_accelerator().type)


class RandomState:
    """The CPU random state and that of every device of the current accelerator (CUDA, XPU, MPS, ...), captured
    so that several passes can draw the same numbers."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.module = _accelerator_module()
        initialized = getattr(self.module, "is_initialized", lambda: True)
        if self.module is not None and initialized():
            get_all = getattr(self.module, "get_rng_state_all", None)
            self.device = get_all() if get_all is not None else [self.module.get_rng_state()]
        else:
            self.device = None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            set_all = getattr(self.module, "set_rng_state_all", None)
            if set_all is not None:
                set_all(self.device)
            else:
                self.module.set_rng_state(self.device[0])


@contextlib.contextmanager
def frozen_norm_statistics(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run BatchNorm/InstanceNorm-type layers in training mode without updating their running statistics.

    In training mode such a layer normalises with the batch statistics whether or not it tracks running ones, so
    switching `track_running_stats` off for a pass changes nothing but the update of `running_mean`, `running_var`
    and `num_batches_tracked`. `F.instance_norm` updates existing running buffers whatever the flag says, so the
    buffers of InstanceNorm layers are also saved and copied back. Restored even when the pass raises.
    """
    modules = list(modules)
    switched = [m for m in modules if m.track_running_stats]
    saved = [(buf, buf.clone()) for m in modules if isinstance(m, nn.modules.instancenorm._InstanceNorm)
             for buf in (m.running_mean, m.running_var, getattr(m, "num_batches_tracked", None)) if buf is not None]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True
        for buf, copy in saved:
            buf.copy_(copy)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of `model` that keep running statistics (BatchNorm, SyncBatchNorm, InstanceNorm)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


class GAMStep:
    """Runs the passes of one micro-batch and leaves the GAM (or SAM) direction in `p.grad`.

    `params` are the trainable parameters; gradients already in their `.grad` (earlier micro-batches of
    the same optimizer step) are set aside during the passes and added back after, so each micro-batch
    contributes its own direction. Parameters that receive no gradient in the first pass take no part: whatever
    a later pass leaves in their `.grad` is discarded, so they end the step as the stock step leaves them.

    The work buffers are flat tensors, one per (device, dtype), with a view per parameter: a free buffer then
    doubles as the bucket of a single all-reduce.

    Host synchronisation: every norm, inner product and coefficient stays on the device. A micro-batch reads one
    value on the host (whether a pass failed) only when it must drop a non-finite gradient (`nonfinite="drop"`).
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("The model has no trainable parameters (every parameter has requires_grad=False).")
        self._flat: dict[str, dict[tuple, Tensor]] = {}
        self._views: dict[str, list[Tensor]] = {}
        # The stored correction for reuse steps: the part of d orthogonal to g0, divided by ||g0||, of the last full
        # step, for the parameters at `_correction_index` (None until a full step stored one).
        self._correction_index: Optional[list[int]] = None

    def matches(self, params: Iterable[Tensor]) -> bool:
        """Whether `params` (trainable ones only) are exactly the parameters this step was built for."""
        trainable = [p for p in params if p.requires_grad]
        return len(trainable) == len(self.params) and all(a is b for a, b in zip(trainable, self.params))

    @property
    def has_correction(self) -> bool:
        return self._correction_index is not None

    def clear_correction(self) -> None:
        self._correction_index = None

    def _buffer(self, name: str, index: list[int]) -> list[Tensor]:
        """The views of work buffer `name` for the parameters at `index` (allocated once, on first use)."""
        if name not in self._views:
            locals_ = [local_tensor(p.detach()) for p in self.params]
            sizes: dict[tuple, int] = {}
            for t in locals_:
                sizes[(t.device, t.dtype)] = sizes.get((t.device, t.dtype), 0) + t.numel()
            flat = {kind: torch.empty(n, dtype=kind[1], device=kind[0]) for kind, n in sizes.items()}
            offsets = dict.fromkeys(sizes, 0)
            views = []
            for t in locals_:
                kind = (t.device, t.dtype)
                views.append(flat[kind][offsets[kind] : offsets[kind] + t.numel()].view_as(t))
                offsets[kind] += t.numel()
            self._flat[name], self._views[name] = flat, views
        return [self._views[name][i] for i in index]

    def buffer_numel(self) -> int:
        """Elements held in work buffers, to compare with the number of trainable parameter elements."""
        return sum(t.numel() for flat in self._flat.values() for t in flat.values())

    def run(self, inputs: StepInputs, *, store_correction: bool = False, reuse: bool = False) -> GAMStats:
        """Run the passes of one micro-batch and leave d (plus the set-aside gradients) in `p.grad`.

        Which passes run: `reuse`, one pass that applies the stored correction (see `_reuse_pass`); else, when
        `inputs.sub_forward_backward` is given, GAM's passes on that part of the micro-batch and one pass on all of
        it (see `_sub_batch_passes`); else GAM's (or SAM's) passes on the micro-batch (see `_run_passes`).

        In DDP "local" mode the micro-batch that ends the optimizer step also averages the accumulated gradients
        over the ranks, once.

        Every pass runs even when an earlier one produced a non-finite gradient, so that data-parallel ranks stay
        in step (a rank that stopped early would leave the others waiting in any collective of the forward).

        Args:
            inputs: the micro-batch's passes and the step's settings (see `StepInputs`).
            store_correction: after a full step, keep the part of d orthogonal to g0, divided by ||g0|| (one more
                parameter-sized buffer), for later reuse steps.
            reuse: one pass only: d = g0 + ||g0|| * the stored correction (requires `has_correction`).
        """
        if inputs.nonfinite not in ("mark", "drop"):
            raise ValueError(f"nonfinite must be 'mark' or 'drop'; got {inputs.nonfinite!r}")
        if reuse and not self.has_correction:
            raise RuntimeError("A reuse step needs a correction stored by an earlier full step.")
        params = self.params
        set_aside = [p.grad for p in params]
        for p in params:
            p.grad = None
        stats = GAMStats(loss=torch.tensor(math.nan))
        index: list[int] = []
        try:
            if reuse:
                self._reuse_pass(inputs, stats=stats, index=index)
            elif inputs.hp.perturbation == "momentum":
                self._momentum_pass(inputs, stats=stats, index=index)
            elif inputs.sub_forward_backward is not None:
                self._sub_batch_passes(inputs, stats=stats, index=index)
            else:
                self._run_passes(inputs, stats=stats, index=index, store_correction=store_correction)
            first = params[index[0]].grad
            if inputs.nonfinite == "mark":
                # A loss scaler skips the step only if it finds a non-finite gradient: make sure there is one
                # (adds 0 where every pass was finite). Indexing works for any memory layout.
                first = local_tensor(first)
                element = (0,) * first.dim()
                marker = torch.where(stats.failed, math.nan, 0.0).to(device=first.device, dtype=first.dtype)
                first[element] = first[element] + marker
            elif stats.failed.item():  # the one host synchronisation of the micro-batch
                stats.dropped = True
                for i in index:
                    params[i].grad = None
        finally:
            for p, earlier in zip(params, set_aside):
                if earlier is None:
                    continue
                if p.grad is None:
                    p.grad = earlier
                else:
                    p.grad.add_(earlier)
        data_parallel = inputs.data_parallel
        if data_parallel is not None and data_parallel.mode == "local" and data_parallel.sync_now:
            stats.collectives += self.average_gradients(data_parallel.group)
        return stats

    def _gradients(self, pass_index: int, *, index: list[int], stats: GAMStats,
                   data_parallel: Optional[DataParallel], free_buffer: Optional[str]) -> list[Tensor]:
        """After a pass: the local gradients of the active parameters (`index`), averaged over ranks first in global
        mode (using the free work buffer as the bucket when there is one). Gradients of parameters outside `index`
        are dropped; an active parameter the pass did not reach gets zeros."""
        params = self.params
        if pass_index == 0:
            index.extend(i for i, p in enumerate(params) if p.grad is not None)
            if not index:
                raise RuntimeError("No trainable parameter received a gradient: does the loss depend on them?")
        else:
            active = set(index)
            for i, p in enumerate(params):
                if i not in active:
                    p.grad = None  # reached only at a perturbed point: takes no part
                elif p.grad is None:  # used at theta but not at the perturbed point
                    p.grad = torch.zeros_like(p)
        grads = [local_tensor(params[i].grad) for i in index]
        if data_parallel is not None and data_parallel.mode == "global":
            scratch = self._flat.get(free_buffer) if free_buffer is not None else None
            stats.collectives += all_reduce_mean_(grads, group=data_parallel.group, scratch=scratch)
        stats.passes += 1
        return grads

    def _reuse_pass(self, inputs: StepInputs, *, stats: GAMStats, index: list[int]) -> None:
        """One pass on the micro-batch: d = g0 + ||g0|| * stored correction (for the parameters the correction was
        stored for)."""
        stats.loss = inputs.forward_backward(0)
        g = self._gradients(0, index=index, stats=stats, data_parallel=inputs.data_parallel, free_buffer="theta")
        stats.grad_norm = global_norm(g, reduce=inputs.reduce)
        stats.failed = ~torch.isfinite(stats.grad_norm)
        active = set(index)
        stored = [i for i in self._correction_index if i in active]
        grads = [local_tensor(self.params[i].grad) for i in stored]
        correction = self._buffer("correction", stored)
        if inputs.hp.reuse_orthogonal:
            # d = g0 + ||g0|| (c - <c, g0> / (||g0||^2 + xi) g0): only the part of the correction c orthogonal to the
            # current gradient, written as g0 scaled, then ||g0|| c added (the stored c is left as it is).
            along = global_dot(correction, grads, reduce=inputs.reduce) / (stats.grad_norm.square() + inputs.hp.eps)
            scale_(g, factor=1.0 - stats.grad_norm * along)
        add_scaled_(grads, correction, factor=stats.grad_norm)

    def _momentum_pass(self, inputs: StepInputs, *, stats: GAMStats, index: list[int]) -> None:
        """One pass, SAM's gradient along the optimizer's momentum m instead of an ascent pass (Momentum-SAM, Becker
        et al., 2024): the parameters move to theta - rho' m / (||m|| + xi) (adaptive: - rho' m theta^2 /
        (||m |theta| || + xi)), and the gradient there is d. m accumulates gradients, so this is a step against the
        momentum, as in the paper. A parameter without momentum takes part with zeros; with no momentum at all
        (the first step) the pass runs at theta. The parameters return to theta bit for bit; the loss is the one
        at the perturbed point."""
        hp, reduce = inputs.hp, inputs.reduce
        if hp.method != "sam":
            raise ValueError("The momentum perturbation replaces SAM's ascent pass: it needs method 'sam'.")
        if inputs.momentum is None or len(inputs.momentum) != len(self.params):
            raise ValueError("The momentum perturbation needs one momentum entry (or None) per parameter.")
        everything = list(range(len(self.params)))
        theta_params = [local_tensor(p.detach()) for p in self.params]
        theta = self._buffer("theta", everything)
        direction = self._buffer("h_minus", everything)
        torch._foreach_copy_(theta, theta_params)
        for buffer, m in zip(direction, inputs.momentum):
            if m is None:
                buffer.zero_()
            else:
                buffer.copy_(local_tensor(m))
        try:
            ascend_(theta_params, direction, radius=-hp.grad_rho, eps=hp.eps, adaptive=hp.adaptive, reduce=reduce)
            stats.loss = inputs.forward_backward(0)
        finally:
            torch._foreach_copy_(theta_params, theta)
        g = self._gradients(0, index=index, stats=stats, data_parallel=inputs.data_parallel, free_buffer="h_minus")
        stats.grad_norm = global_norm(g, reduce=reduce)
        stats.failed = ~torch.isfinite(stats.grad_norm)

    def _sub_batch_passes(self, inputs: StepInputs, *, stats: GAMStats, index: list[int]) -> None:
        """GAM's passes on a part of the micro-batch (`inputs.sub_forward_backward`; correction stored, no pass moves
        running statistics), then one pass on all of it, from the random state the step started with, that applies
        the correction: d = g0 + ||g0|| * correction, 1 + 4 * (part / micro-batch) passes' worth of compute. The
        metrics of the passes on the part are kept (flatness, cos); loss and ||g0|| are the whole micro-batch's."""
        rng_start = RandomState()
        part = GAMStats(loss=torch.tensor(math.nan))
        on_part = dataclasses.replace(inputs, forward_backward=inputs.sub_forward_backward, sub_forward_backward=None)
        self._run_passes(on_part, stats=part, index=[], store_correction=True, freeze_first=True)
        for p in self.params:
            p.grad = None
        rng_start.restore()  # the whole-batch pass draws what the stock step would
        self._reuse_pass(inputs, stats=stats, index=index)
        stats.flatness, stats.cos = part.flatness, part.cos
        stats.failed = stats.failed | part.failed
        stats.passes += part.passes
        stats.collectives += part.collectives

    def _run_passes(self, inputs: StepInputs, *, stats: GAMStats, index: list[int], store_correction: bool,
                    freeze_first: bool = False) -> None:
        """GAM's four passes (SAM's two) on the micro-batch of `inputs.forward_backward`; d is left in `p.grad`.

        In the notation of GAM_MATH.md, with rho' = `hp.grad_rho`, rho = `hp.grad_norm_rho`, xi = `hp.eps` and every
        norm global over the active parameters (summed over shards by `inputs.reduce`):

        - pass 1, at theta: g0. theta is saved into the "theta" buffer, g0 into "h_minus" (and into "correction"
          when `store_correction`); theta1 = theta + rho' g0 / (||g0|| + xi).
        - pass 2, at theta1: g1, the SAM gradient. The parameters serve as scratch for h0 = g1 - g0, the ascent
          direction of the gradient norm, and ||h0|| / rho' is the flatness metric. For SAM, d = g1: stop here.
          Otherwise theta2 = theta + rho h0 / (||h0|| + xi) and alpha g1 is kept in "g1_scaled" (with the "paper"
          formula, h- starts as beta g0).
        - pass 3, at theta2: g2. h- = g0 + (1 - beta) g2 ("released"; beta g0 + (1 - beta) g2 with "paper");
          theta3 = theta2 + rho' g2 / (||g2|| + xi).
        - pass 4, at theta3: g3. h+ = alpha g1 + (1 - alpha) g3 is built in `p.grad`, then
          d = h+ - gamma (h- - c h+), c = cos * ||h-|| / (||h+|| + xi), cos = <h-, h+> / (||h+|| ||h-|| + xi).

        With `hp.adaptive` every perturbation r v / (||v|| + xi) becomes r v base^2 / (||v |base| || + xi), base the
        point it starts from. Pass 1 alone moves the running statistics of `inputs.norm_modules` (none does with
        `freeze_first`); with `inputs.same_rng`, passes 2-4 start from the random state pass 1 started with, and the
        state pass 1 left is restored at the end. The parameters are copied back from "theta" at the end, also
        when a pass raises. `stats.failed` records whether any norm or coefficient was non-finite.
        """
        hp, reduce = inputs.hp, inputs.reduce
        rho_prime, rho = hp.grad_rho, hp.grad_norm_rho
        params = self.params
        rng_start = RandomState() if inputs.same_rng else None
        rng_after_first: Optional[RandomState] = None
        restore_from: Optional[list[Tensor]] = None

        def run_pass(pass_index: int, free_buffer: Optional[str]) -> list[Tensor]:
            nonlocal rng_after_first
            if pass_index == 0:
                with frozen_norm_statistics(inputs.norm_modules if freeze_first else ()):
                    stats.loss = inputs.forward_backward(0)
                rng_after_first = RandomState() if inputs.same_rng else None
            else:
                if rng_start is not None:
                    rng_start.restore()
                with frozen_norm_statistics(inputs.norm_modules):
                    inputs.forward_backward(pass_index)
            return self._gradients(pass_index, index=index, stats=stats, data_parallel=inputs.data_parallel,
                                   free_buffer=free_buffer)

        try:
            # Pass 1: g0 at theta. Save theta and g0 (into the h- buffer, and the correction buffer if asked).
            g = run_pass(0, free_buffer="h_minus")
            stats.grad_norm = global_norm(g, reduce=reduce)
            failed = ~torch.isfinite(stats.grad_norm)
            if inputs.run_full is not None and not inputs.run_full(stats.grad_norm):
                stats.failed = failed
                return  # d = g0, already in p.grad: the stock step
            theta_params = [local_tensor(params[i].detach()) for i in index]
            theta = self._buffer("theta", index)
            h_minus = self._buffer("h_minus", index)
            torch._foreach_copy_(theta, theta_params)
            restore_from = theta
            torch._foreach_copy_(h_minus, g)
            if store_correction:
                torch._foreach_copy_(self._buffer("correction", index), g)
            ascend_(theta_params, g, radius=rho_prime, eps=hp.eps, adaptive=hp.adaptive, reduce=reduce,
                    norm=stats.grad_norm)  # theta1
            self._release_grads(index, g)

            # Pass 2: g1 at theta1. The parameters become scratch for h0 = g1 - g0.
            g = run_pass(1, free_buffer="g1_scaled")
            torch._foreach_copy_(theta_params, g)
            torch._foreach_sub_(theta_params, h_minus)
            if hp.method == "sam":
                h0_norm = global_norm(theta_params, reduce=reduce)
                stats.flatness = h0_norm / max(rho_prime, hp.eps)
                stats.failed = failed | ~torch.isfinite(h0_norm)
                if store_correction:
                    self._store_correction(index, g, g0_norm=stats.grad_norm, eps=hp.eps, reduce=reduce,
                                           failed=stats.failed)
                return  # d = g1, already in p.grad
            h0_norm = ascend_from_(theta_params, theta, radius=rho, eps=hp.eps, adaptive=hp.adaptive,
                                   reduce=reduce)  # theta2
            stats.flatness = h0_norm / max(rho_prime, hp.eps)
            failed |= ~torch.isfinite(h0_norm)
            g1_scaled = self._buffer("g1_scaled", index)
            torch._foreach_copy_(g1_scaled, g)
            torch._foreach_mul_(g1_scaled, hp.alpha)
            if hp.formula == "paper":
                torch._foreach_mul_(h_minus, hp.beta)
            self._release_grads(index, g)

            # Pass 3: g2 at theta2; h- gets (1 - beta) g2; theta3 = theta2 + rho' g2 / ||g2||.
            g = run_pass(2, free_buffer=None)
            torch._foreach_add_(h_minus, g, alpha=1.0 - hp.beta)
            g2_norm = ascend_(theta_params, g, radius=rho_prime, eps=hp.eps, adaptive=hp.adaptive, reduce=reduce)
            failed |= ~torch.isfinite(g2_norm)
            self._release_grads(index, g)

            # Pass 4: g3 at theta3; h+ = alpha g1 + (1 - alpha) g3 is built in p.grad, then d.
            g = run_pass(3, free_buffer=None)
            torch._foreach_mul_(g, 1.0 - hp.alpha)
            torch._foreach_add_(g, g1_scaled)
            stats.cos, factor = remove_orthogonal_part_(g, h_minus, gamma=hp.gamma, eps=hp.eps, reduce=reduce)
            stats.failed = failed | ~torch.isfinite(factor) | ~torch.isfinite(stats.cos)
            if store_correction:
                self._store_correction(index, g, g0_norm=stats.grad_norm, eps=hp.eps, reduce=reduce,
                                       failed=stats.failed)
        finally:
            if restore_from is not None:
                torch._foreach_copy_([local_tensor(params[i].detach()) for i in index], restore_from)
            if rng_after_first is not None:
                rng_after_first.restore()

    def _store_correction(self, index: list[int], d: list[Tensor], *, g0_norm: Tensor, eps: float,
                          reduce: Optional[ReduceFn], failed: Tensor) -> None:
        """correction <- (d - <d, g0> / ||g0||^2 g0) / ||g0||, in place (the buffer holds g0 on entry).

        When a pass failed (`failed`, a 0-dim bool tensor) the correction is zero, so that the reuse steps until the
        next full step are plain gradient steps rather than non-finite ones. Decided on the device: a rank does not
        learn that another failed, and every rank keeps running the same passes."""
        correction = self._buffer("correction", index)
        coefficient = global_dot(d, correction, reduce=reduce) / (g0_norm.square() + eps)
        scale_(correction, factor=-coefficient)
        torch._foreach_add_(correction, d)
        scale_(correction, factor=1.0 / (g0_norm + eps))
        for flat in self._flat["correction"].values():
            flat.masked_fill_(failed.to(flat.device), 0.0)
        self._correction_index = list(index)

    def average_gradients(self, group: Optional[object] = None) -> int:
        """Average the accumulated gradients over the ranks in one bucketed all-reduce; returns the count.

        A parameter with no gradient here takes part with zeros; it keeps no gradient if the average is zero on
        every rank (unused everywhere), as DDP leaves globally unused parameters.
        """
        missing = [p.grad is None for p in self.params]
        grads = [local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p.detach()))
                 for p in self.params]
        calls = all_reduce_mean_(grads, group=group, scratch=self._flat.get("h_minus"))
        for p, g, was_missing in zip(self.params, grads, missing):
            if was_missing and bool(g.any()):
                p.grad = g
        return calls

    def _release_grads(self, index: list[int], grads: list[Tensor]) -> None:
        """Drop this pass's gradients (from `p.grad` and from the caller's list), so that their memory is free
        before the next backward allocates the next ones."""
        for i in index:
            self.params[i].grad = None
        grads.clear()
