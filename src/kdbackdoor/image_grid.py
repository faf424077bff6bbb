"""Pictures of image batches: rows of pixel images on a grey grid, saved as PNG."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from kdbackdoor.atomic import atomic_path
from kdbackdoor.errors import KDBackdoorError

MIN_SIDE = 64  # smaller images are enlarged (nearest) to at least this many pixels
GAP = 2  # pixels of grey between cells
GAP_VALUE = 0.5


def save_image_grid(rows: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``rows`` (R, N, C, H, W), pixel [0, 1], as a PNG of R rows and N columns.

    Grey PNG for 1 channel, RGB for 3; images smaller than 64 px are enlarged (nearest
    neighbour). Written atomically. Returns the path.
    """
    if rows.dim() != 5 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise KDBackdoorError(f"save_image_grid: need a non-empty (rows, N, C, H, W) tensor, got {tuple(rows.shape)}")
    channels, height, width = rows.shape[2:]
    if channels not in (1, 3):
        raise KDBackdoorError(f"cannot draw {channels}-channel images")
    rows = rows.detach().float().cpu()
    scale = max(1, math.ceil(MIN_SIDE / max(height, width)))
    rows = rows.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    cells = F.pad(rows, (GAP, 0, GAP, 0), value=GAP_VALUE)  # gap above and left of each cell
    r, n, cell_h, cell_w = cells.shape[0], cells.shape[1], cells.shape[-2], cells.shape[-1]
    canvas = cells.permute(2, 0, 3, 1, 4).reshape(channels, r * cell_h, n * cell_w)
    canvas = F.pad(canvas, (0, GAP, 0, GAP), value=GAP_VALUE)
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def save_image_batch(images: torch.Tensor, path: str | os.PathLike, columns: int = 8) -> Path:
    """Write a batch (N, C, H, W), pixel [0, 1], as a PNG grid ``columns`` wide (the last row
    padded with grey). Returns the path."""
    if images.dim() != 4 or len(images) == 0:
        raise KDBackdoorError(f"save_image_batch: need a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    columns = min(columns, len(images))
    missing = -len(images) % columns
    padded = torch.cat([images.detach().float().cpu(), torch.full((missing, *images.shape[1:]), GAP_VALUE)])
    return save_image_grid(padded.view(-1, columns, *images.shape[1:]), path)
