"""WaNet (Nguyen & Tran 2021): an imperceptible warp of the whole image.

A k×k grid of random offsets in [-1, 1] (drawn from the seed), normalised to mean absolute
value 1, is upsampled bicubically to the image size and added, times s / side, to the
identity sampling grid in [-1, 1] coordinates (so pixels move by about s/2 · offset
pixels), clamped to the image, then sampled bilinearly (``grid_sample``, align_corners).
Defaults k = 4, s = 0.5 as in the paper and BackdoorBench. The "noise mode" of WaNet
training (random warps with the true label) belongs to the poisoning attack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdbackdoor.triggers.base import Trigger, TriggerParams
from kdbackdoor.triggers.registry import register_trigger


@register_trigger("wanet")
class WaNet(Trigger):
    """Smooth random warp of the whole image (k=4 control points per side, strength s=0.5)."""

    class Params(TriggerParams):
        k: int = Field(4, ge=1)
        s: float = Field(0.5, ge=0)

    def _build(self) -> dict[str, torch.Tensor]:
        _, height, width = self.image_shape
        k = self.params.k
        offsets = torch.rand(1, 2, k, k, generator=self._generator(), dtype=torch.float64) * 2 - 1
        offsets = offsets / offsets.abs().mean()
        field = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True)
        field = field[0].permute(1, 2, 0)  # (H, W, 2): x (column) offset, then y (row) offset
        ys = torch.linspace(-1, 1, height, dtype=torch.float64)
        xs = torch.linspace(-1, 1, width, dtype=torch.float64)
        identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
        sides = torch.tensor([width, height], dtype=torch.float64)
        grid = (identity + self.params.s * field / sides).clamp(-1, 1)
        return {"grid": grid[None]}

    def _apply(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), align_corners=True)
