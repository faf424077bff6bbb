"""Small label-preserving views of pixel images: Gaussian noise, blur, JPEG re-encoding, crop+flip.

All views take and return float pixel batches in [0, 1] shaped (N, C, H, W) on any device.
A clean image keeps its class under them; an adversarially crafted image usually does not,
which is what the brittleness filter measures and what robust distillation exploits.
Random draws come from a CPU ``torch.Generator`` so results are the same on every device.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from kdbackdoor.data.augment import random_crop, random_hflip
from kdbackdoor.data.dataset import to_uint8
from kdbackdoor.errors import KDBackdoorError

ViewKind = Literal["noise", "blur", "jpeg", "crop-flip"]
VIEW_KINDS: dict[str, str] = {
    "noise": "add Gaussian pixel noise of std noise_sigma, then clamp to [0, 1]",
    "blur": "Gaussian blur of std blur_sigma px (reflect padding)",
    "jpeg": "JPEG re-encoding at jpeg_quality (PIL, per image)",
    "crop-flip": "random crop after zero padding of crop_padding px, then a random left-right flip",
}


class ViewConfig(BaseModel):
    """Which views to draw and how strong they are (pixel units, images in [0, 1])."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kinds: list[ViewKind] = Field(default_factory=lambda: ["noise", "blur", "jpeg", "crop-flip"], min_length=1)
    noise_sigma: float = Field(8 / 255, ge=0, le=1, description="std of the Gaussian noise, pixel units")
    blur_sigma: float = Field(0.75, gt=0, le=8, description="std of the Gaussian blur kernel, in px")
    jpeg_quality: int = Field(60, ge=1, le=100, description="JPEG quality (PIL scale 1..100)")
    crop_padding: int | None = Field(None, ge=0, description="crop padding in px (default: image side // 8)")


def parse_kinds(text: str) -> list[str]:
    """``"noise,blur"`` -> ``["noise", "blur"]``; unknown names raise a KDBackdoorError."""
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [kind for kind in kinds if kind not in VIEW_KINDS]
    if not kinds or unknown:
        raise KDBackdoorError(f"unknown view kind(s) {unknown or [text]}; available: {', '.join(VIEW_KINDS)}")
    return kinds


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` plus N(0, sigma²) noise per pixel (pixel units), clamped to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    return (x + sigma * noise).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with std ``sigma`` px (kernel radius ceil(2·sigma)), per channel."""
    radius = max(1, int(np.ceil(2 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding needs pad < size
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image encoded as JPEG at ``quality`` and decoded again (through uint8, with PIL)."""
    stored = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
    mode = "L" if stored.shape[-1] == 1 else "RGB"
    decoded = np.empty_like(stored)
    for i, image in enumerate(stored):
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if mode == "L" else image, mode).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        decoded[i] = np.asarray(Image.open(buffer)).reshape(image.shape)
    return torch.from_numpy(decoded).permute(0, 3, 1, 2).to(x.device, x.dtype).div_(255)


def crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding of ``padding`` px, then a random left-right flip."""
    return random_hflip(random_crop(x, padding, generator), generator)


def _crop_flip_view(x: torch.Tensor, config: ViewConfig, generator: torch.Generator | None) -> torch.Tensor:
    padding = config.crop_padding if config.crop_padding is not None else max(1, x.shape[-1] // 8)
    return crop_flip(x, padding, generator)


_APPLY = {
    "noise": lambda x, config, generator: gaussian_noise(x, config.noise_sigma, generator),
    "blur": lambda x, config, generator: gaussian_blur(x, config.blur_sigma),
    "jpeg": lambda x, config, generator: jpeg(x, config.jpeg_quality),
    "crop-flip": _crop_flip_view,
}


def apply_view(x: torch.Tensor, kind: str, config: ViewConfig,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One view of kind ``kind`` of the pixel batch ``x`` (same shape, values in [0, 1])."""
    if kind not in _APPLY:
        raise KDBackdoorError(f"unknown view kind {kind!r}; available: {', '.join(VIEW_KINDS)}")
    return _APPLY[kind](x, config, generator)


def is_random(kind: str) -> bool:
    """Whether repeated views of this kind differ (noise, crop-flip) or not (blur, jpeg)."""
    return kind in ("noise", "crop-flip")
