"""The SIG trigger (Barni et al. 2019): a horizontal sinusoid added to the image,
v(i, j) = amplitude · sin(2π · frequency · j / W), then clipped.

Defaults follow BackdoorBench: Δ = 40 on 0..255 (amplitude 40/255) and f = 6. ABD /
Trap-and-Replace use a different definition: they *blend* their ``sig.png`` with alpha 0.2
(0.8·x + 0.2·pattern), i.e. ``image:sig.png?mode=blend&alpha=0.2``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from kdbackdoor.triggers.base import TriggerParams
from kdbackdoor.triggers.overlay import OverlayTrigger, no_weight
from kdbackdoor.triggers.registry import register_trigger


@register_trigger("sig")
class Sig(OverlayTrigger):
    """Horizontal sinusoid added to all rows and channels (amplitude 40/255, 6 periods per width)."""

    class Params(TriggerParams):
        amplitude: float = Field(40 / 255, gt=0, le=1)  # in pixel units [0, 1]
        frequency: float = Field(6.0, gt=0)  # periods across the image width

    def _build(self) -> dict[str, torch.Tensor]:
        width = self.image_shape[2]
        columns = torch.arange(width, dtype=torch.float64)
        signal = self.params.amplitude * torch.sin(2 * math.pi * self.params.frequency * columns / width)
        return {"weight": no_weight(), "overlay": signal.view(1, 1, width)}

    def changed_mask(self) -> None:
        return None  # a full-image signal; its zero-crossing columns are no local region
