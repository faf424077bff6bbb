"""A picture of what a trigger does: clean images, triggered images and their difference."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from kdbackdoor.atomic import atomic_path
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.triggers.base import Trigger

MIN_SIDE = 64  # smaller images are enlarged (nearest) to at least this many pixels
GAP = 2  # pixels of grey between cells
GAP_VALUE = 0.5


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
    clean, triggered = before.detach(), after.detach()
    channels, height, width = clean.shape[1:]
    if channels not in (1, 3):
        raise KDBackdoorError(f"cannot draw {channels}-channel images")
    difference = (triggered - clean).abs()
    difference = difference / difference.max().clamp_min(1e-12)
    rows = torch.stack([clean, triggered, difference]).float().cpu()  # (3, n, C, H, W)

    scale = max(1, math.ceil(MIN_SIDE / max(height, width)))
    rows = rows.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    cells = F.pad(rows, (GAP, 0, GAP, 0), value=GAP_VALUE)  # gap above and left of each cell
    n, cell_h, cell_w = cells.shape[1], cells.shape[-2], cells.shape[-1]
    canvas = cells.permute(2, 0, 3, 1, 4).reshape(channels, 3 * cell_h, n * cell_w)
    canvas = F.pad(canvas, (0, GAP, 0, GAP), value=GAP_VALUE)

    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
