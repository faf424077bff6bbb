"""STRIP (Gao et al., 2019): a triggered input stays confidently classified when blended with clean images.

Each image is blended with ``n`` random clean overlays; a backdoored model keeps predicting
the target on triggered inputs whatever the overlay, so their mean prediction entropy is
low. Low entropy = suspicious.
"""

from __future__ import annotations

import torch

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.numerics import autocast


@torch.no_grad()
def strip_entropy(
    model: torch.nn.Module, images: torch.Tensor, overlays: torch.Tensor, n: int = 16,
    alpha: float = 0.5, generator: torch.Generator | None = None, batch_size: int = 256,
) -> torch.Tensor:
    """Mean prediction entropy (nats) of ``model`` per image over ``n`` random blends.

    images: pixel [0, 1] (N, C, H, W); overlays: a pool of clean pixel images (M, C, H, W) of
    the same shape per image. Blend k of image i is ``alpha * x_i + (1 - alpha) * overlay_j``
    with j drawn uniformly from the pool by ``generator`` (CPU). Returns a float CPU tensor (N,).
    The model runs on the device of its parameters, in eval mode.
    """
    if n < 1:
        raise KDBackdoorError(f"STRIP needs at least one blend per image, got n={n}")
    if not 0.0 <= alpha <= 1.0:
        raise KDBackdoorError(f"STRIP blend weight alpha must lie in [0, 1], got {alpha}")
    if overlays.dim() != 4 or len(overlays) == 0 or overlays.shape[1:] != images.shape[1:]:
        raise KDBackdoorError(
            f"STRIP overlays must be a non-empty pool shaped (M, {', '.join(map(str, images.shape[1:]))}), "
            f"got {tuple(overlays.shape)}"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Draw all overlay choices up front so results do not depend on batch_size.
    choice = torch.randint(0, len(overlays), (len(images), n), generator=generator)
    per_chunk = max(1, batch_size // n)
    out = []
    try:
        for start in range(0, len(images), per_chunk):
            x = images[start:start + per_chunk].to(device).float()
            over = overlays[choice[start:start + per_chunk].flatten().to(overlays.device)].to(device).float()
            blends = alpha * x.repeat_interleave(n, 0) + (1 - alpha) * over
            with autocast(device):
                logits = model(blends)
            logp = torch.log_softmax(logits.float(), 1)
            entropy = -(logp.exp() * logp).sum(1)
            out.append(entropy.view(-1, n).mean(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
