"""Implicit hyper-gradient of a min-max problem by fixed-point iteration.

For an inner problem δ*(θ) = argmin_δ L_in(δ, θ) solved approximately (δ given), the total
derivative of an outer loss L_out(δ*(θ), θ) is

    dL_out/dθ = ∂L_out/∂θ + (∂Φ/∂θ)ᵀ v,   v = (∂Φ/∂δ)ᵀ v + ∂L_out/∂δ,

where Φ(δ, θ) = δ − η·∇_δ L_in(δ, θ) is one gradient step on the inner problem (δ* is its
fixed point) and v is found by iterating the second equation (a truncated Neumann series).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Loss = Callable[[torch.Tensor], torch.Tensor]


def implicit_hypergradient(
    params: Sequence[torch.Tensor],
    delta: torch.Tensor,
    inner_loss: Loss,
    outer_loss: Loss,
    *,
    inner_lr: float = 0.1,
    iterations: int = 5,
) -> list[torch.Tensor]:
    """dL_out/dθ for each tensor of ``params`` (θ), with δ at ``delta``.

    ``inner_loss(δ)`` and ``outer_loss(δ)`` compute the losses with the current ``params``
    (through closures). Returns one gradient per parameter (zeros where a parameter is unused).
    """
    params = list(params)
    delta = delta.detach().requires_grad_(True)
    outer = outer_loss(delta)
    grad_outer_delta, *grad_outer_params = _grads(outer, [delta, *params])
    step = delta - inner_lr * torch.autograd.grad(inner_loss(delta), delta, create_graph=True)[0]
    v = torch.zeros_like(delta)
    for _ in range(iterations):
        v = torch.autograd.grad(step, delta, grad_outputs=v, retain_graph=True)[0] + grad_outer_delta
    indirect = _grads(step, params, grad_outputs=v)
    return [direct + through_delta for direct, through_delta in zip(grad_outer_params, indirect)]


def _grads(output: torch.Tensor, inputs: list[torch.Tensor], grad_outputs: torch.Tensor | None = None) -> list[torch.Tensor]:
    grads = torch.autograd.grad(output, inputs, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
