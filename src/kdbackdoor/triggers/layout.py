"""Where patch triggers go, at any resolution.

Lengths of patch triggers are given in pixels of a 32×32 image and scaled per axis:
``pixels = floor(length · side / 32 + 0.5)`` (at least 1 for sizes, at least 0 for offsets).
So a 4-pixel square is 1 px on 8×8 digits, 4 px on CIFAR and 28 px at 224×224.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.triggers.base import TriggerParams

REFERENCE_SIDE = 32

Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]


def scale_length(length: float, side: int, minimum: int = 1) -> int:
    """``length`` pixels at 32 px, converted to an image side of ``side`` pixels."""
    return max(minimum, math.floor(length * side / REFERENCE_SIDE + 0.5))


def scale_pair(length: float, image_shape: tuple[int, int, int], minimum: int = 1) -> tuple[int, int]:
    """``length`` at 32 px as (rows, columns) pixels for images of ``image_shape`` (C, H, W)."""
    _, height, width = image_shape
    return scale_length(length, height, minimum), scale_length(length, width, minimum)


def place_in_corner(
    cells: torch.Tensor,
    box: tuple[int, int],
    corner: Corner,
    offset: tuple[int, int],
    image_shape: tuple[int, int, int],
    trigger_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stretch ``cells`` (K, r, c) to a ``box`` of (rows, columns) pixels (nearest) and put it
    ``offset`` (rows, columns) pixels away from both edges of ``corner``.

    Returns (pattern (K, H, W), coverage (1, H, W)), zero outside the box, float64.
    """
    _, height, width = image_shape
    (box_h, box_w), (off_h, off_w) = box, offset
    if box_h + off_h > height or box_w + off_w > width:
        raise KDBackdoorError(
            f"trigger '{trigger_name}': a {box_h}x{box_w} px patch {off_h}x{off_w} px from the "
            f"{corner} corner does not fit in {height}x{width} images"
        )
    top = off_h if corner.startswith("top") else height - off_h - box_h
    left = off_w if corner.endswith("left") else width - off_w - box_w
    stretched = F.interpolate(cells[None].double(), size=(box_h, box_w), mode="nearest-exact")[0]
    pattern = torch.zeros(cells.shape[0], height, width, dtype=torch.float64)
    pattern[:, top : top + box_h, left : left + box_w] = stretched
    coverage = torch.zeros(1, height, width, dtype=torch.float64)
    coverage[:, top : top + box_h, left : left + box_w] = 1.0
    return pattern, coverage


class CornerPatchParams(TriggerParams):
    """A square patch near a corner; ``size`` and ``offset`` are pixels at 32 px."""

    size: int = Field(4, ge=1)
    corner: Corner = "bottom-right"
    offset: int = Field(1, ge=0)


def place_patch(
    cells: torch.Tensor, params: CornerPatchParams, image_shape: tuple[int, int, int], trigger_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``place_in_corner`` for a size×size patch ``offset`` pixels (both scaled) from the corner."""
    return place_in_corner(
        cells,
        scale_pair(params.size, image_shape),
        params.corner,
        scale_pair(params.offset, image_shape, minimum=0),
        image_shape,
        trigger_name,
    )
