"""Triggers read from an image file: ``image:PATH?mode=MODE&option=value``.

Modes, all written as out = x·(1 − weight) + overlay (see ``overlay``), then clipped:
- ``patch`` (default): paste the image's pixels where its alpha channel says (fractional
  alpha blends), or, for a file without alpha, wherever it is non-zero;
- ``mask``: paste the image where ``mask=FILE`` is 1 (a ``.npy`` array or a grey image);
  ABD's l0_inv is ``image:l0_inv.png?mode=mask&mask=mask.npy``;
- ``blend``: (1 − alpha)·x + alpha·image, ``alpha`` default 0.2 (ABD's blend and sig);
- ``add``: x + image (ABD's trojan_wm, trojan_3x3, trojan_8x8, l2_inv);
- ``add-renormalize``: x + image, then each image min-max rescaled to [0, 1] (ABD's smooth).
An alpha channel also scales what blend and the add modes contribute.

Files of another size are resized to the data's (``resize=antialias``, the default, follows
scikit-image as ABD does; ``resize=nearest`` keeps hard edges); colours are then rounded to
8-bit levels as ABD's ``img_as_ubyte`` does, coverage (alpha, mask) is resized the same way.

``config()`` records the files' absolute paths and sha256; rebuilding from it refuses a file
that has changed since.

Against ABD's uint8 pipeline: ABD computes on 0..255 in float and truncates to uint8 at the
end; we keep floats, so each value lies less than one 8-bit level (1/255) above ABD's.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from kdbackdoor.triggers.base import TriggerParams
from kdbackdoor.triggers.files import decode_image, decode_mask, read_pinned
from kdbackdoor.triggers.overlay import OverlayTrigger, no_weight
from kdbackdoor.triggers.registry import register_trigger
from kdbackdoor.triggers.resize import ResizeMethod, resize

ImageMode = Literal["patch", "mask", "blend", "add", "add-renormalize"]
ADDITIVE_MODES = ("add", "add-renormalize")
DEFAULT_BLEND_ALPHA = 0.2


class ImageParams(TriggerParams):
    path: str = Field(min_length=1)
    mode: ImageMode = "patch"
    alpha: float | None = Field(None, gt=0, le=1)  # blend only, default 0.2
    mask: str | None = None  # mask mode only
    resize: ResizeMethod = "antialias"
    sha256: str | None = Field(None, repr=False)
    mask_sha256: str | None = Field(None, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _default_blend_alpha(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") == "blend" and data.get("alpha") is None:
            return {**data, "alpha": DEFAULT_BLEND_ALPHA}
        return data

    @model_validator(mode="after")
    def _options_fit_mode(self) -> "ImageParams":
        if self.alpha is not None and self.mode != "blend":
            raise ValueError(f"alpha applies to mode=blend only, not mode={self.mode}")
        if (self.mask is not None) != (self.mode == "mask"):
            raise ValueError("mode=mask needs mask=FILE, and mask=FILE needs mode=mask")
        if self.mask_sha256 is not None and self.mask is None:
            raise ValueError("mask_sha256 needs mask=FILE")
        return self


@register_trigger("image")
class ImageTrigger(OverlayTrigger):
    """Pattern from an image file: pasted, masked, blended or added (modes above)."""

    positional = "path"
    Params = ImageParams

    @property
    def renormalize(self) -> bool:  # type: ignore[override]
        return self.params.mode == "add-renormalize"

    def _build(self) -> dict[str, torch.Tensor]:
        channels, height, width = self.image_shape
        params = self.params
        path, data, digest = read_pinned(params.path, params.sha256, "image", self.name)
        colour, alpha = decode_image(data, path, channels, self.name)
        pinned = {"path": str(path), "sha256": digest}
        if params.mode == "mask":
            mask_path, mask_data, mask_digest = read_pinned(
                params.mask, params.mask_sha256, "mask", self.name
            )
            coverage = decode_mask(mask_data, mask_path, channels, self.name)
            pinned.update(mask=str(mask_path), mask_sha256=mask_digest)
        elif alpha is not None:
            coverage = alpha
        elif params.mode == "patch":
            coverage = (colour != 0).any(dim=0, keepdim=True).double()
        else:
            coverage = torch.ones(1, 1, 1, dtype=torch.float64)
        # config() records the absolute paths and the hashes of the bytes actually read.
        self.params = params.model_copy(update=pinned)

        colour = (resize(colour, (height, width), params.resize) * 255).round() / 255
        coverage = resize(coverage, (height, width), params.resize)
        strength = params.alpha if params.mode == "blend" else 1.0
        overlay = strength * coverage * colour
        weight = no_weight() if params.mode in ADDITIVE_MODES else strength * coverage
        return {"weight": weight, "overlay": overlay}
