"""Trojan-style triggers (Liu et al. 2018) as ABD uses them: a pattern *added* to the image,
then clipped. ABD's patterns are optimised image files (load them with ``image:…?mode=add``);
these are procedural stand-ins whose colours are drawn uniformly in [0, 1] from the seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.triggers.base import TriggerParams
from kdbackdoor.triggers.layout import REFERENCE_SIDE, CornerPatchParams, place_patch
from kdbackdoor.triggers.overlay import OverlayTrigger, no_weight
from kdbackdoor.triggers.registry import register_trigger


class TrojanPatch(OverlayTrigger):
    """Square of size×size random colour cells added near a corner (cells are 1 px at 32 px)."""

    class Params(CornerPatchParams):
        size: int = Field(3, ge=1)
        offset: int = Field(4, ge=0)

    def _build(self) -> dict[str, torch.Tensor]:
        size = self.params.size
        colours = torch.rand(self.image_shape[0], size, size, generator=self._generator(),
                             dtype=torch.float64)
        pattern, _ = place_patch(colours, self.params, self.image_shape, self.name)
        return {"weight": no_weight(), "overlay": pattern}


@register_trigger("trojan-3x3")
class Trojan3x3(TrojanPatch):
    """3×3 random-colour patch added 4 px from the bottom-right corner (where ABD's sits)."""


@register_trigger("trojan-8x8")
class Trojan8x8(TrojanPatch):
    """8×8 random-colour patch added 2 px from the bottom-right corner (where ABD's sits)."""

    class Params(TrojanPatch.Params):
        size: int = Field(8, ge=1)
        offset: int = Field(2, ge=0)


@register_trigger("trojan-wm")
class TrojanWatermark(OverlayTrigger):
    """Ring of random colours around the image centre, added as a watermark.

    ``radius`` (outer) and ``width`` are pixels at 32 px; the ring scales with each axis.
    """

    class Params(TriggerParams):
        radius: float = Field(10.0, gt=0)
        width: float = Field(2.0, gt=0)

    def _build(self) -> dict[str, torch.Tensor]:
        channels, height, width = self.image_shape
        # Pixel centres in 32-px units, relative to the image centre.
        rows = (torch.arange(height, dtype=torch.float64) + 0.5) * REFERENCE_SIDE / height
        cols = (torch.arange(width, dtype=torch.float64) + 0.5) * REFERENCE_SIDE / width
        distance = torch.hypot(rows[:, None] - REFERENCE_SIDE / 2, cols[None, :] - REFERENCE_SIDE / 2)
        ring = (distance <= self.params.radius) & (distance > self.params.radius - self.params.width)
        if not ring.any():
            raise KDBackdoorError(
                f"trigger '{self.name}': a ring of radius {self.params.radius} and width "
                f"{self.params.width} covers no pixel of {height}x{width} images"
            )
        # Colours live on a 32×32 grid so the watermark looks the same at every resolution.
        grid = torch.rand(1, channels, REFERENCE_SIDE, REFERENCE_SIDE, generator=self._generator(),
                          dtype=torch.float64)
        colours = F.interpolate(grid, size=(height, width), mode="nearest-exact")[0]
        return {"weight": no_weight(), "overlay": colours * ring}
