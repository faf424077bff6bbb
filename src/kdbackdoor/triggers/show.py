"""A picture of what a trigger does: clean images, triggered images and their difference."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.image_grid import save_image_grid
from kdbackdoor.triggers.base import Trigger


def render_trigger_grid(
    trigger: Trigger, images: torch.Tensor, path: str | os.PathLike, *, max_images: int = 8
) -> Path:
    """Write a PNG grid for the first ``max_images`` of ``images`` (N, C, H, W) in [0, 1].

    Row 1: clean images; row 2: triggered; row 3: |triggered − clean| divided by its
    maximum so the change is visible. Grey PNG for 1 channel, RGB for 3. Returns the path.
    """
    if max_images < 1 or len(images) == 0:
        raise KDBackdoorError(f"render_trigger_grid: nothing to show (max_images={max_images}, "
                              f"{len(images)} images)")
    clean = images[:max_images].detach()
    return render_change_grid(clean, trigger.apply(clean).detach(), path)


def render_change_grid(before: torch.Tensor, after: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a PNG grid: ``before`` images (N, C, H, W, [0,1]) on row 1, ``after`` on row 2,
    and |after − before| scaled to its maximum on row 3. Returns the path."""
    if before.shape != after.shape or before.dim() != 4 or len(before) == 0:
        raise KDBackdoorError(f"render_change_grid: need two equal non-empty (N, C, H, W) batches, got "
                              f"{tuple(before.shape)} and {tuple(after.shape)}")
    clean, changed = before.detach().float(), after.detach().float()
    difference = (changed - clean).abs()
    difference = difference / difference.max().clamp_min(1e-12)
    return save_image_grid(torch.stack([clean, changed, difference]), path)
