"""Batched, on-device augmentation of pixel-space images (N, C, H, W) in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad each image by ``padding`` pixels (zeros) and crop back to its size at a random offset.

    One offset per image, drawn from ``generator`` (on CPU, so runs are reproducible on any device).
    """
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (N, H)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing over (N, H, W) with channels kept: gather rows then columns.
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutmix(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability ``p`` per image, paste a random box from another image of the batch.

    The box's area share is uniform in (0, 1) (CutMix with a Beta(1, 1) mixing ratio); its
    centre is uniform over the image and it is clipped at the borders. Labels are not
    mixed: use it where a teacher labels the mixed images (distillation with λ = 1).
    """
    if p <= 0:
        return x
    n, _, h, w = x.shape
    apply = torch.rand(n, generator=generator) < p
    share = torch.rand(n, generator=generator)
    partner = torch.randint(0, n, (n,), generator=generator)
    cy, cx = torch.rand(n, generator=generator) * h, torch.rand(n, generator=generator) * w
    half_h, half_w = h * share.sqrt() / 2, w * share.sqrt() / 2
    top, bottom = (cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h)
    left, right = (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)
    rows, cols = torch.arange(h)[None, :] + 0.5, torch.arange(w)[None, :] + 0.5
    inside_rows = (rows >= top[:, None]) & (rows < bottom[:, None])  # (N, H)
    inside_cols = (cols >= left[:, None]) & (cols < right[:, None])  # (N, W)
    box = (inside_rows[:, :, None] & inside_cols[:, None, :] & apply[:, None, None]).to(x.device)
    return torch.where(box[:, None], x[partner.to(x.device)], x)


def augment(
    x: torch.Tensor, *, crop_padding: int = 4, hflip: bool = True, cutmix_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop with zero padding, random horizontal flip, then CutMix (all optional)."""
    x = random_crop(x, crop_padding, generator)
    if hflip:
        x = random_hflip(x, generator)
    return cutmix(x, cutmix_p, generator)
