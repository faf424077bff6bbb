"""Projected gradient descent in pixel space, targeted or untargeted, L∞ or L2."""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

Norm = Literal["linf", "l2"]


def _project(delta: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / flat).clamp(max=1.0).view(-1, 1, 1, 1)


def _ascent_direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm = "linf",
    targeted: bool = False,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_probability: float | None = None,
) -> torch.Tensor:
    """Perturb pixel-space images ``x`` ([0,1], (N,C,H,W)) within an ``eps`` ball.

    Untargeted: maximise cross-entropy to ``labels``; targeted: minimise it (``labels`` are
    the targets). ``eps`` and ``step_size`` are in pixel units (8/255 = 8 grey levels).
    ``transform`` (e.g. a trigger) is applied to the perturbed image before the model, so
    the perturbation is optimised for what the model will see. The model's parameters get
    no gradients and its mode is left as it was (use eval mode for BatchNorm models).

    ``stop_probability`` (targeted only): an image whose current iterate the model gives its
    target with at least this probability keeps that iterate and leaves the batch, so later
    steps cost less.
    """
    if stop_probability is not None and not targeted:
        raise ValueError("stop_probability applies to targeted PGD only")
    x = x.detach()
    delta = torch.zeros_like(x)
    if random_start:
        noise = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
        delta = _project(noise * eps, eps, norm)
    delta = (x + delta).clamp(0, 1) - x
    sign = -1.0 if targeted else 1.0
    # images still being optimised: all (a slice, so no copies), or those not yet at stop_probability
    active = slice(None) if stop_probability is None else torch.arange(len(x), device=x.device)
    for _ in range(steps):
        x_active, target = x[active], labels[active]
        if len(x_active) == 0:
            break
        d = delta[active].detach().requires_grad_(True)
        inputs = x_active + d
        logits = model(transform(inputs) if transform is not None else inputs)
        loss = F.cross_entropy(logits, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, d)
        with torch.no_grad():
            stepped = _project(d + sign * step_size * _ascent_direction(grad, norm), eps, norm)
            stepped = (x_active + stepped).clamp(0, 1) - x_active
            if stop_probability is not None:
                reached = logits.float().softmax(1).gather(1, target[:, None]).squeeze(1) >= stop_probability
                stepped[reached] = d[reached]
            delta[active] = stepped
            if stop_probability is not None:
                active = active[~reached]
    return (x + delta).detach()
