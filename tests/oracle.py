"""A float64 straight-line implementation of the GAM step (accelerated GAM, Algorithm 2 of the paper), to
compare the optimised code against.

Every quantity is a flat vector over the trainable parameters; nothing is done in place.
"""

import copy

import torch
from torch import nn


def flat_gradient_fn(model: nn.Module, batch: dict, loss_fn=None):
    """theta (flat float64 vector of the trainable parameters) -> gradient of the loss on `batch`."""
    work = copy.deepcopy(model).double()
    params = [p for p in work.parameters() if p.requires_grad]

    def gradient(theta: torch.Tensor) -> torch.Tensor:
        torch.nn.utils.vector_to_parameters(theta, params)
        outputs = work(**batch)
        loss = loss_fn(outputs, batch) if loss_fn is not None else outputs["loss"]
        grads = torch.autograd.grad(loss, params)
        return torch.cat([g.reshape(-1) for g in grads])

    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    return gradient, theta


def oracle_direction(gradient, theta, *, method="gam", grad_rho=0.02, grad_norm_rho=0.2, alpha=0.6, beta=0.5,
                     gamma=0.03, formula="released", adaptive=False, eps=1e-12):
    """GAM's d as hf_gam/gam.py's module docstring states it (or SAM's g1), one fresh gradient per point."""

    def perturbed(base, g, radius):
        if adaptive:
            return base + radius * g * base**2 / ((g * base.abs()).norm() + eps)
        return base + radius * g / (g.norm() + eps)

    g0 = gradient(theta)
    theta1 = perturbed(theta, g0, grad_rho)
    g1 = gradient(theta1)
    if method == "sam":
        return g1
    h0 = g1 - g0
    theta2 = perturbed(theta, h0, grad_norm_rho)
    g2 = gradient(theta2)
    theta3 = perturbed(theta2, g2, grad_rho)
    g3 = gradient(theta3)
    h_plus = alpha * g1 + (1 - alpha) * g3
    if formula == "released":
        h_minus = g0 + (1 - beta) * g2
    else:
        h_minus = beta * g0 + (1 - beta) * g2
    cos = (h_minus @ h_plus) / (h_plus.norm() * h_minus.norm() + eps)
    h_perp = h_minus - cos * h_minus.norm() / (h_plus.norm() + eps) * h_plus
    return h_plus - gamma * h_perp


def flat_gradient_of(model: nn.Module, loss_of):
    """Like `flat_gradient_fn`, for a loss the caller computes from the model: `loss_of(work)` returns the loss of
    `work`, a float64 copy of `model` (for example a trainer's own `compute_loss` on a collated batch)."""
    work = copy.deepcopy(model).double().train()
    params = [p for p in work.parameters() if p.requires_grad]

    def gradient(theta: torch.Tensor) -> torch.Tensor:
        torch.nn.utils.vector_to_parameters(theta, params)
        grads = torch.autograd.grad(loss_of(work), params)
        return torch.cat([g.reshape(-1) for g in grads])

    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    return gradient, theta
