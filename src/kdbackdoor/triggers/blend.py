"""The blended trigger (Chen et al. 2017): out = (1 − alpha)·x + alpha·pattern.

Here the pattern is seeded uniform noise; to blend with a picture (ABD and BackdoorBench use
Hello Kitty) use ``image:PATH?mode=blend&alpha=0.2``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kdbackdoor.triggers.base import TriggerParams
from kdbackdoor.triggers.overlay import OverlayTrigger
from kdbackdoor.triggers.registry import register_trigger


@register_trigger("blend")
class Blend(OverlayTrigger):
    """Alpha-blend with uniform random noise drawn from the seed (default alpha 0.2)."""

    class Params(TriggerParams):
        alpha: float = Field(0.2, gt=0, le=1)

    def _build(self) -> dict[str, torch.Tensor]:
        noise = torch.rand(self.image_shape, generator=self._generator(), dtype=torch.float64)
        alpha = self.params.alpha
        return {"weight": torch.full((1, 1, 1), alpha, dtype=torch.float64), "overlay": alpha * noise}
