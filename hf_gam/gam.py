"""GAM's update (accelerated GAM, Algorithm 2 of Zhang et al., CVPR 2023) over lists of tensors.

Nothing here knows about `transformers`: `GAMStep.run` receives a `forward_backward(pass_index)` callable
that leaves the gradient of one pass in `p.grad`, and it leaves the GAM direction `d` in `p.grad` with the
parameters back at theta, bit for bit. In the symbols of the paper:

    g0 = grad L(theta)
    g1 = grad L(theta + rho' g0 / ||g0||)                  h0 = g1 - g0
    g2 = grad L(theta2),  theta2 = theta + rho h0 / ||h0||
    g3 = grad L(theta2 + rho' g2 / ||g2||)
    h+ = alpha g1 + (1 - alpha) g3
    h- = g0 + (1 - beta) g2          ("released")  or  beta g0 + (1 - beta) g2  ("paper")
    d  = h+ - gamma (h- - <h-, h+> / ||h+||^2 h+)

Work memory: three parameter-sized buffers (theta, h-, alpha * g1), allocated on first use and reused.
The parameters themselves serve as scratch space for h0 while they do not hold theta.
"""

import contextlib
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
    """What one micro-batch's passes measured (the loss stays a device tensor, as the Trainer expects)."""

    loss: Tensor  # loss at theta (pass 1), as the stock training step returns it
    grad_norm: float = math.nan  # ||g0||
    flatness: float = math.nan  # ||g1 - g0|| / rho'
    cos: float = math.nan  # cosine of h- and h+ (GAM only)
    skipped: bool = False  # a pass produced a non-finite gradient; the passes stopped
    collectives: int = 0  # gradient all-reduces this micro-batch issued


def local_tensor(t: Tensor) -> Tensor:
    """The part of `t` stored on this process: the local shard of a DTensor, `t` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


BUCKET_BYTES = 25 * 2**20  # the bucket size DDP uses by default


def all_reduce_mean_(
    tensors: Sequence[Tensor],
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


def _accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 for float64 tensors; float32 otherwise (16-bit tensors are accumulated at least in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def sum_of_squares(tensors: Sequence[Tensor], reduce: Optional[ReduceFn] = None) -> Tensor:
    """sum_i ||t_i||^2, accumulated in float64, then summed by `reduce`."""
    if len(tensors) == 0:
        total = torch.zeros((), dtype=torch.float64)
    else:
        device = tensors[0].device
        # In float64 (MPS has none: float32 there): a loss-scaled float32 gradient near 1e38 is finite, its
        # square is not, and a false overflow would skip a good step.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
        total = torch.stack([n.to(device) for n in norms]).square().sum()
    return reduce(total) if reduce is not None else total


def global_norm(tensors: Sequence[Tensor], reduce: Optional[ReduceFn] = None) -> float:
    """The L2 norm of the concatenation of `tensors` (over all shards when `reduce` is given)."""
    return math.sqrt(sum_of_squares(tensors, reduce).item())


def global_dot(a: Sequence[Tensor], b: Sequence[Tensor], reduce: Optional[ReduceFn] = None) -> float:
    """<a, b> over all the tensors (and shards), accumulated in float32 (float64 for float64 tensors)."""
    dtype = _accumulation_dtype(a)
    device = a[0].device
    parts = [torch.sum(x * y, dtype=dtype).to(device) for x, y in zip(a, b)]
    total = torch.stack(parts).sum()
    return (reduce(total) if reduce is not None else total).item()


def weighted_norm(direction: Sequence[Tensor], weights: Sequence[Tensor], reduce: Optional[ReduceFn] = None) -> float:
    """|| direction * |weights| ||, one tensor at a time (no parameter-sized temporary)."""
    dtype = _accumulation_dtype(direction)
    device = direction[0].device
    parts = [torch.sum((d * w.abs()).square(), dtype=dtype).to(device) for d, w in zip(direction, weights)]
    total = torch.stack(parts).sum()
    return math.sqrt((reduce(total) if reduce is not None else total).item())


def ascend_(
    params: list[Tensor],
    direction: list[Tensor],
    radius: float,
    eps: float,
    adaptive: bool,
    reduce: Optional[ReduceFn] = None,
    norm: Optional[float] = None,
) -> float:
    """Move `params` by `radius` along `direction`, in place; returns the norm used to normalise.

    Plain: params += radius * direction / (||direction|| + eps); `norm` is ||direction|| when already known.
    Adaptive: params += radius * direction * params^2 / (||direction * |params| || + eps).
    """
    if not adaptive:
        norm = global_norm(direction, reduce) if norm is None else norm
        torch._foreach_add_(params, direction, alpha=radius / (norm + eps))
        return norm
    norm = weighted_norm(direction, params, reduce)
    scale = radius / (norm + eps)
    for p, d in zip(params, direction):
        p.add_(d * p * p, alpha=scale)
    return norm


def ascend_from_(
    params: list[Tensor],
    base: list[Tensor],
    radius: float,
    eps: float,
    adaptive: bool,
    reduce: Optional[ReduceFn] = None,
) -> float:
    """`params` holds a direction h on entry; on exit it holds base + radius * h / (||h|| + eps)
    (adaptive: base + radius * h * base^2 / (||h * |base| || + eps)). Returns ||h|| (the plain norm)."""
    norm = global_norm(params, reduce)
    if not adaptive:
        torch._foreach_mul_(params, radius / (norm + eps))
        torch._foreach_add_(params, base)
        return norm
    scale = radius / (weighted_norm(params, base, reduce) + eps)
    for p, b in zip(params, base):
        p.mul_(b).mul_(b).mul_(scale).add_(b)
    return norm


def remove_orthogonal_part_(
    h_plus: list[Tensor], h_minus: list[Tensor], gamma: float, eps: float, reduce: Optional[ReduceFn] = None
) -> tuple[float, float]:
    """h_plus <- h+ - gamma * (h- - c h+), the part of h- orthogonal to h+ removed, in place.

    c = cos * ||h-|| / (||h+|| + eps) with cos = <h-, h+> / (||h+|| ||h-|| + eps), the form of the
    released code. Returns (cos, ||h+||).
    """
    norm_plus = global_norm(h_plus, reduce)
    norm_minus = global_norm(h_minus, reduce)
    cos = global_dot(h_minus, h_plus, reduce) / (norm_plus * norm_minus + eps)
    coefficient = cos * norm_minus / (norm_plus + eps)
    torch._foreach_mul_(h_plus, 1.0 + gamma * coefficient)
    torch._foreach_add_(h_plus, h_minus, alpha=-gamma)
    return cos, norm_plus


class RandomState:
    """The CPU and CUDA random states, captured so that several passes can draw the same numbers."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@contextlib.contextmanager
def frozen_norm_statistics(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run BatchNorm-type layers in training mode without updating their running statistics.

    In training mode such a layer normalises with the batch statistics whether or not it tracks
    running ones, so switching `track_running_stats` off for a pass changes nothing but the update of
    `running_mean`, `running_var` and `num_batches_tracked`. Restored even when the pass raises.
    """
    switched = [m for m in modules if m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of `model` that keep running statistics (BatchNorm, SyncBatchNorm, InstanceNorm)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


class GAMStep:
    """Runs the passes of one micro-batch and leaves the GAM (or SAM) direction in `p.grad`.

    `params` are the trainable parameters; gradients already in their `.grad` (earlier micro-batches of
    the same optimizer step) are set aside during the passes and added back after, so each micro-batch
    contributes its own direction. Parameters that receive no gradient in the first pass take no part.

    The work buffers are flat tensors, one per (device, dtype), with a view per parameter: a free buffer then
    doubles as the bucket of a single all-reduce.
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("The model has no trainable parameters (every parameter has requires_grad=False).")
        self._flat: dict[str, dict[tuple, Tensor]] = {}
        self._views: dict[str, list[Tensor]] = {}

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

    def run(
        self,
        forward_backward: Callable[[int], Tensor],
        hp: GAMHyperParams,
        grad_rho: Optional[float] = None,
        grad_norm_rho: Optional[float] = None,
        norm_modules: Sequence[nn.Module] = (),
        same_rng: bool = True,
        reduce: Optional[ReduceFn] = None,
        data_parallel: Optional[DataParallel] = None,
    ) -> GAMStats:
        """Run the passes and leave d (plus the set-aside gradients) in `p.grad`.

        In DDP "local" mode the micro-batch that ends the optimizer step also averages the accumulated gradients
        over the ranks, once.

        Args:
            forward_backward: runs one forward and backward pass on the micro-batch, returns the loss. It must not
                synchronise gradients across data-parallel ranks itself (run it under DDP's `no_sync`).
            hp: the hyper-parameters; `grad_rho`/`grad_norm_rho` override its radii (for schedules).
            norm_modules: BatchNorm-type layers; only pass 1 moves their running statistics.
            same_rng: give passes 2-4 the random state pass 1 started with (same dropout masks).
            reduce: sums partial scalars over the shards of a sharded (FSDP) model.
            data_parallel: the DDP semantics (see `DataParallel`); None in one process and under FSDP.
        """
        stats = self._run_passes(forward_backward, hp, grad_rho, grad_norm_rho, norm_modules, same_rng, reduce,
                                 data_parallel)
        if data_parallel is not None and data_parallel.mode == "local" and data_parallel.sync_now:
            stats.collectives += self.average_gradients(data_parallel.group)
        return stats

    def _run_passes(self, forward_backward, hp, grad_rho, grad_norm_rho, norm_modules, same_rng, reduce,
                    data_parallel) -> GAMStats:
        rho_prime = hp.grad_rho if grad_rho is None else grad_rho
        rho = hp.grad_norm_rho if grad_norm_rho is None else grad_norm_rho
        params = self.params
        set_aside = [p.grad for p in params]
        for p in params:
            p.grad = None
        average_each_pass = data_parallel is not None and data_parallel.mode == "global"

        rng_start = RandomState() if same_rng else None
        rng_after_first: Optional[RandomState] = None
        restore_from: Optional[list[Tensor]] = None
        index: list[int] = []
        stats = GAMStats(loss=torch.tensor(math.nan))

        def run_pass(pass_index: int, free_buffer: Optional[str]) -> list[Tensor]:
            """One forward/backward; returns the local gradients of the active parameters (averaged over
            ranks first in global mode, using the free work buffer as the bucket when there is one)."""
            nonlocal rng_after_first
            if pass_index == 0:
                stats.loss = forward_backward(0)
                rng_after_first = RandomState() if same_rng else None
                index.extend(i for i, p in enumerate(params) if p.grad is not None)
                if not index:
                    raise RuntimeError("No trainable parameter received a gradient: does the loss depend on them?")
            else:
                if rng_start is not None:
                    rng_start.restore()
                with frozen_norm_statistics(norm_modules):
                    forward_backward(pass_index)
            for i in index:
                if params[i].grad is None:  # used at theta but not at the perturbed point
                    params[i].grad = torch.zeros_like(params[i])
            grads = [local_tensor(params[i].grad) for i in index]
            if average_each_pass:
                scratch = self._flat[free_buffer] if free_buffer is not None and free_buffer in self._flat else None
                stats.collectives += all_reduce_mean_(grads, data_parallel.group, scratch)
            return grads

        def finite(value: float) -> bool:
            """False (and the step marked skipped, its gradient made non-finite) when `value` is not finite."""
            if math.isfinite(value):
                return True
            stats.skipped = True
            # A loss scaler skips the step only if it finds a non-finite gradient: make sure there is one.
            params[index[0]].grad.view(-1)[0] = math.nan
            return False

        try:
            # Pass 1: g0 at theta. Save theta and g0 (into the h- buffer).
            g = run_pass(0, free_buffer="h_minus")
            stats.grad_norm = global_norm(g, reduce)
            if not finite(stats.grad_norm):
                return stats
            theta_params = [local_tensor(params[i].detach()) for i in index]
            theta = self._buffer("theta", index)
            h_minus = self._buffer("h_minus", index)
            torch._foreach_copy_(theta, theta_params)
            torch._foreach_copy_(h_minus, g)
            restore_from = theta
            ascend_(theta_params, g, rho_prime, hp.eps, hp.adaptive, reduce, norm=stats.grad_norm)  # theta1
            self._release_grads(index, g)

            # Pass 2: g1 at theta1. The parameters become scratch for h0 = g1 - g0.
            g = run_pass(1, free_buffer="g1_scaled")
            torch._foreach_copy_(theta_params, g)
            torch._foreach_sub_(theta_params, h_minus)
            if hp.method == "sam":
                stats.flatness = global_norm(theta_params, reduce) / max(rho_prime, hp.eps)
                finite(stats.flatness)
                return stats  # d = g1, already in p.grad
            h0_norm = ascend_from_(theta_params, theta, rho, hp.eps, hp.adaptive, reduce)  # theta2
            stats.flatness = h0_norm / max(rho_prime, hp.eps)
            if not finite(h0_norm):
                return stats
            g1_scaled = self._buffer("g1_scaled", index)
            torch._foreach_copy_(g1_scaled, g)
            torch._foreach_mul_(g1_scaled, hp.alpha)
            if hp.formula == "paper":
                torch._foreach_mul_(h_minus, hp.beta)
            self._release_grads(index, g)

            # Pass 3: g2 at theta2; h- gets (1 - beta) g2; theta3 = theta2 + rho' g2 / ||g2||.
            g = run_pass(2, free_buffer=None)
            if not finite(ascend_(theta_params, g, rho_prime, hp.eps, hp.adaptive, reduce)):
                return stats
            torch._foreach_add_(h_minus, g, alpha=1.0 - hp.beta)
            self._release_grads(index, g)

            # Pass 4: g3 at theta3; h+ = alpha g1 + (1 - alpha) g3 is built in p.grad, then d.
            g = run_pass(3, free_buffer=None)
            torch._foreach_mul_(g, 1.0 - hp.alpha)
            torch._foreach_add_(g, g1_scaled)
            cos, norm_plus = remove_orthogonal_part_(g, h_minus, hp.gamma, hp.eps, reduce)
            stats.cos = cos
            finite(norm_plus)
            return stats
        finally:
            if restore_from is not None:
                torch._foreach_copy_([local_tensor(params[i].detach()) for i in index], restore_from)
            if rng_after_first is not None:
                rng_after_first.restore()
            for p, earlier in zip(params, set_aside):
                if earlier is None:
                    continue
                if p.grad is None:
                    p.grad = earlier
                else:
                    p.grad.add_(earlier)

    def average_gradients(self, group: Optional[object] = None) -> int:
        """Average the accumulated gradients over the ranks in one bucketed all-reduce; returns the count.

        A parameter with no gradient here takes part with zeros; it keeps no gradient if the average is zero on
        every rank (unused everywhere), as DDP leaves globally unused parameters.
        """
        missing = [p.grad is None for p in self.params]
        grads = [local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p.detach()))
                 for p in self.params]
        calls = all_reduce_mean_(grads, group, scratch=self._flat.get("h_minus"))
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
