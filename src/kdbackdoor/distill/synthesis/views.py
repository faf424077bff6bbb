"""Cheap batched views of synthetic images used during synthesis (pixel space, same shape out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def jitter_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Roll the batch by a random offset of up to 1/16 of the side and flip it half of the time
    (one draw per batch, as in DeepInversion)."""
    limit = max(1, x.shape[-1] // 16)
    dy, dx = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=generator))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x.flip(3) if torch.rand((), generator=generator) < 0.5 else x


def local_crop(x: torch.Tensor, generator: torch.Generator, min_scale: float = 0.25) -> torch.Tensor:
    """A random crop covering ``min_scale``–1 of each image's area, resized back to full size
    (a different crop per image; bilinear, through ``affine_grid``)."""
    n = len(x)
    scale = (min_scale + (1 - min_scale) * torch.rand(n, generator=generator)).sqrt()
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - scale)[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
