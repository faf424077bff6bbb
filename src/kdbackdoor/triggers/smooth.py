"""The smooth (low-frequency) trigger of Zeng et al. 2021 as ABD applies it: add a smooth
colour pattern, then min-max rescale each image back to [0, 1].

ABD's patterns are files (``image:smooth_cifar10.png?mode=add-renormalize``); this is a
procedural stand-in: seeded random colours on a coarse grid, upsampled bicubically and
rescaled to [0, amplitude].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdbackdoor.triggers.base import TriggerParams
from kdbackdoor.triggers.overlay import OverlayTrigger, no_weight
from kdbackdoor.triggers.registry import register_trigger


@register_trigger("smooth")
class Smooth(OverlayTrigger):
    """Smooth random colour field in [0, 0.2] added, then each image min-max rescaled."""

    renormalize = True

    class Params(TriggerParams):
        amplitude: float = Field(0.2, gt=0, le=1)  # the pattern's maximum (ABD's files: 51/255)
        cells: int = Field(4, ge=2)  # coarse grid side: fewer cells, lower frequency

    def _build(self) -> dict[str, torch.Tensor]:
        channels, height, width = self.image_shape
        cells = self.params.cells
        coarse = torch.rand(1, channels, cells, cells, generator=self._generator(), dtype=torch.float64)
        field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0]
        field = (field - field.min()) / (field.max() - field.min())
        return {"weight": no_weight(), "overlay": self.params.amplitude * field}
