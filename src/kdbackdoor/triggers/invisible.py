"""Norm-bounded "invisible" triggers used by ABD / Trap-and-Replace (after Li et al. 2020):
l0-inv changes a few pixels completely, l2-inv changes every pixel a little.

ABD's versions are optimised image files (``image:l0_inv.png?mode=mask&mask=mask.npy`` and
``image:l2_inv.png?mode=add``); these are procedural stand-ins drawn from the seed.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from kdbackdoor.triggers.base import TriggerParams
from kdbackdoor.triggers.layout import REFERENCE_SIDE
from kdbackdoor.triggers.overlay import OverlayTrigger, no_weight
from kdbackdoor.triggers.registry import register_trigger


@register_trigger("l0-inv")
class L0Invisible(OverlayTrigger):
    """A few pixels at random positions replaced by random black/white colours per channel.

    ``pixels`` counts them at 32×32 (default 9, as ABD's mask) and scales with the image
    area: floor(pixels · H·W / 1024 + 0.5), at least 1.
    """

    class Params(TriggerParams):
        pixels: int = Field(9, ge=1, le=REFERENCE_SIDE**2)

    def _build(self) -> dict[str, torch.Tensor]:
        channels, height, width = self.image_shape
        count = max(1, math.floor(self.params.pixels * height * width / REFERENCE_SIDE**2 + 0.5))
        generator = self._generator()
        chosen = torch.randperm(height * width, generator=generator)[:count]
        coverage = torch.zeros(height * width, dtype=torch.float64)
        coverage[chosen] = 1.0
        coverage = coverage.view(1, height, width)
        colours = torch.randint(0, 2, (channels, height, width), generator=generator).double()
        return {"weight": coverage, "overlay": colours * coverage}


@register_trigger("l2-inv")
class L2Invisible(OverlayTrigger):
    """Gaussian noise over the whole image, added, with root mean square 0.05 by default."""

    class Params(TriggerParams):
        rms: float = Field(0.05, gt=0, le=0.5)  # in pixel units [0, 1]

    def _build(self) -> dict[str, torch.Tensor]:
        noise = torch.randn(self.image_shape, generator=self._generator(), dtype=torch.float64)
        noise *= self.params.rms / noise.square().mean().sqrt()
        return {"weight": no_weight(), "overlay": noise}
