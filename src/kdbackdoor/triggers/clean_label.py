"""The label-consistent (clean-label) trigger of Turner et al. 2019 as used by ABD: the
BadNets 3×3 grid in all four corners. The adversarial perturbation that makes the
attack clean-label is part of the poisoning attack, not of the trigger.
"""

from __future__ import annotations

import torch

from kdbackdoor.triggers.badnets import GridParams, grid_overlay
from kdbackdoor.triggers.overlay import OverlayTrigger
from kdbackdoor.triggers.registry import register_trigger


@register_trigger("clean-label")
class CleanLabel(OverlayTrigger):
    """3×3 black/white grid pasted in each of the four corners (1-px cells, no offset)."""

    Params = GridParams

    def _build(self) -> dict[str, torch.Tensor]:
        corners = ["top-left", "top-right", "bottom-left", "bottom-right"]
        return grid_overlay(corners, self.params, self.image_shape, self.name)
