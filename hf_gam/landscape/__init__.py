"""Pictures of the loss around trained weights: 1-D curves and a 2-D contour along random directions.

Directions are filter-normalized (Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018):
a Gaussian direction is rescaled, filter by filter (slice along the first dimension of every weight with two
or more dimensions), to the norm of the matching filter of the weights; biases and normalization parameters
get no component. So a step of 1 along the direction moves every filter by its own size, and runs whose
weights have different scales can be drawn on one axis.

The loss is evaluated in evaluation mode, without gradients, on a fixed batch; the weights are copied back
exactly afterwards.

    python -m hf_gam.landscape --run adamw=out/adamw --run gam=out/gam --out curves.png [--contour contour.png]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..measuring import measurement_mode, model_loss_fn, unwrap

__all__ = ["filter_normalized_direction", "loss_curve", "loss_surface", "plot_curves", "plot_contour"]


def filter_normalized_direction(model: torch.nn.Module, seed: int = 0) -> list[torch.Tensor]:
    """One random direction, as a list aligned with the model's trainable parameters."""
    generator = torch.Generator().manual_seed(seed)
    direction = []
    for p in unwrap(model).parameters():
        if not p.requires_grad:
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        if p.dim() <= 1:
            d.zero_()
        else:
            w = p.detach().reshape(p.shape[0], -1)
            dv = d.view(p.shape[0], -1)
            dv.mul_(w.norm(dim=1, keepdim=True) / (dv.norm(dim=1, keepdim=True) + 1e-10))
        direction.append(d)
    return direction


def _losses_at(model, batch, loss, offsets: Sequence[Sequence[float]], directions) -> list[float]:
    """Loss at theta + sum_k c_k d_k for every coefficient tuple in `offsets`."""
    model = unwrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    loss_fn = model_loss_fn(model, batch, loss)
    values = []
    try:
        with measurement_mode(model), torch.no_grad():
            for coeffs in offsets:
                for i, (p, s) in enumerate(zip(params, saved)):
                    v = s.clone()
                    for c, d in zip(coeffs, directions):
                        v.add_(d[i], alpha=c)
                    p.copy_(v)
                values.append(float(loss_fn()))
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return values


def loss_curve(model, batch, alphas: Sequence[float], seed: int = 0, loss: Callable | None = None) -> list[float]:
    """Loss along one filter-normalized random direction (seeded), at each step size in `alphas`."""
    direction = filter_normalized_direction(model, seed)
    return _losses_at(model, batch, loss, [(a,) for a in alphas], [direction])


def loss_surface(model, batch, alphas: Sequence[float], seed: int = 0, loss: Callable | None = None):
    """Loss on the grid alphas x alphas spanned by two filter-normalized random directions."""
    directions = [filter_normalized_direction(model, seed), filter_normalized_direction(model, seed + 10_000)]
    flat = _losses_at(model, batch, loss, [(a, b) for a in alphas for b in alphas], directions)
    n = len(alphas)
    return [flat[i * n : (i + 1) * n] for i in range(n)]


def plot_curves(curves: Mapping[str, Sequence[Sequence[float]]], alphas: Sequence[float], path: str, title: str = "") -> None:
    """One panel: for each run, a thin line per direction and a thick line for their mean. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, runs) in enumerate(curves.items()):
        color = f"C{i}"
        for values in runs:
            ax.plot(alphas, values, color=color, alpha=0.25, linewidth=0.8)
        mean = [sum(v[j] for v in runs) / len(runs) for j in range(len(alphas))]
        ax.plot(alphas, mean, color=color, linewidth=2, label=label)
    ax.set_xlabel("step along a filter-normalized random direction")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_contour(surfaces: Mapping[str, Sequence[Sequence[float]]], alphas: Sequence[float], path: str, title: str = "") -> None:
    """One contour panel per run, on shared levels. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = min(min(min(r) for r in s) for s in surfaces.values())
    hi = max(max(max(r) for r in s) for s in surfaces.values())
    levels = [lo + (hi - lo) * (k / 20) ** 2 for k in range(21)]
    fig, axes = plt.subplots(1, len(surfaces), figsize=(4 * len(surfaces), 3.6), squeeze=False)
    for ax, (label, surface) in zip(axes[0], surfaces.items()):
        cs = ax.contour(alphas, alphas, surface, levels=levels)
        ax.clabel(cs, fontsize=6)
        ax.set_title(label)
        ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
