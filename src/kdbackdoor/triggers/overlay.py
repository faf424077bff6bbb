"""Triggers that combine the image with a fixed pattern: out = x·(1 − weight) + overlay.

One rule covers pasting, blending and adding:
- paste a patch:  weight = coverage (1 inside, 0 outside), overlay = colours · coverage;
- blend:          weight = alpha everywhere, overlay = alpha · pattern;
- add (Trojan):   weight = 0, overlay = the pattern (the result is clipped to [0, 1]).
Both tensors are (C or 1, H or 1, W or 1) and broadcast over the batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kdbackdoor.triggers.base import Trigger


class OverlayTrigger(Trigger):
    """A trigger whose ``_build`` returns ``weight`` and ``overlay`` tensors (see module docstring)."""

    renormalize: ClassVar[bool] = False  # min-max rescale each image after adding (ABD's smooth)

    def _apply(self, x: torch.Tensor, weight: torch.Tensor, overlay: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(overlay, x, 1 - weight)  # x·(1 − weight) + overlay, one pass
        return renormalize_per_image(out) if self.renormalize else out

    def changed_mask(self) -> torch.Tensor | None:
        if self.renormalize:
            return None
        _, height, width = self.image_shape
        touched = (self._patterns["weight"] != 0) | (self._patterns["overlay"] != 0)
        mask = touched.any(dim=0).expand(height, width)
        return None if mask.all() else mask.clone()


def renormalize_per_image(x: torch.Tensor) -> torch.Tensor:
    """Min-max rescale each image of (N, C, H, W) to [0, 1] over all its channels and pixels.

    A constant image (no range to rescale) becomes 0.
    """
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - low) / (high - low).clamp_min(torch.finfo(x.dtype).tiny)


def no_weight() -> torch.Tensor:
    """The weight of an additive trigger: the image is kept whole and the overlay added."""
    return torch.zeros(1, 1, 1, dtype=torch.float64)
