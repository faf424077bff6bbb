"""BadNets triggers (Gu et al. 2017) as ABD / Trap-and-Replace define them at 32×32:
a white 4×4 square one pixel from the bottom-right corner, and a 3×3 black/white grid in
the bottom-right corner. Lengths scale with the resolution (see ``layout``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.triggers.base import TriggerParams
from kdbackdoor.triggers.layout import Corner, CornerPatchParams, place_in_corner, place_patch, scale_pair
from kdbackdoor.triggers.overlay import OverlayTrigger
from kdbackdoor.triggers.registry import register_trigger

# ABD's grid, top row first (1 = white, 0 = black). It is not a strict checkerboard: its
# top-left cell is black. The clean-label trigger puts the same grid, unmirrored, in all corners.
GRID_CELLS = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.float64)[None]


@register_trigger("badnets-square")
class BadNetsSquare(OverlayTrigger):
    """White square pasted near a corner (default 4×4 px, 1 px from the bottom-right corner)."""

    Params = CornerPatchParams

    def _build(self) -> dict[str, torch.Tensor]:
        white, coverage = place_patch(torch.ones(1, 1, 1), self.params, self.image_shape, self.name)
        return {"weight": coverage, "overlay": white}


class GridParams(TriggerParams):
    cell: int = Field(1, ge=1)  # side of one grid cell, in pixels at 32 px
    offset: int = Field(0, ge=0)


def grid_overlay(
    corners: list[Corner], params: GridParams, image_shape: tuple[int, int, int], trigger_name: str
) -> dict[str, torch.Tensor]:
    """Weight and overlay pasting ``GRID_CELLS`` into each of ``corners``."""
    cell_h, cell_w = scale_pair(params.cell, image_shape)
    offset = scale_pair(params.offset, image_shape, minimum=0)
    placed = [
        place_in_corner(GRID_CELLS, (3 * cell_h, 3 * cell_w), corner, offset, image_shape, trigger_name)
        for corner in corners
    ]
    pattern = sum(grid for grid, _ in placed)
    coverage = sum(cover for _, cover in placed)
    if coverage.max() > 1:
        _, height, width = image_shape
        raise KDBackdoorError(
            f"trigger '{trigger_name}': the corner grids overlap in {height}x{width} images"
        )
    return {"weight": coverage, "overlay": pattern}


@register_trigger("badnets-grid")
class BadNetsGrid(OverlayTrigger):
    """3×3 black/white grid pasted in a corner (default 1-px cells, bottom-right, no offset)."""

    class Params(GridParams):
        corner: Corner = "bottom-right"

    def _build(self) -> dict[str, torch.Tensor]:
        return grid_overlay([self.params.corner], self.params, self.image_shape, self.name)
