"""Reading trigger files: pinned by sha256, decoded to float tensors in [0, 1]."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdbackdoor.errors import KDBackdoorError

_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def read_pinned(
    path_text: str, expected_sha256: str | None, what: str, trigger_name: str
) -> tuple[Path, bytes, str]:
    """Read a file; return its absolute path, bytes and sha256 (hex).

    Raises KDBackdoorError if it cannot be read or its sha256 differs from ``expected_sha256``.
    """
    path = Path(path_text).expanduser().resolve()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KDBackdoorError(
            f"trigger '{trigger_name}': cannot read {what} file '{path_text}': {error.strerror}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise KDBackdoorError(
            f"trigger '{trigger_name}': {what} file '{path}' has changed since the trigger was "
            f"defined (sha256 {digest}, expected {expected_sha256})"
        )
    return path, data, digest


def decode_image(
    data: bytes, path: Path, channels: int, trigger_name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode image bytes to (colour (K, h, w), alpha (1, h, w) or None), float64 in [0, 1].

    K is 1 for grey files or when ``channels`` is 1 (colour converted with Pillow's ITU-R 601
    luma), else 3; a grey pattern later applies to every channel.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
            grey = channels == 1 or image.mode in _GREY_MODES
            pixels = np.asarray(
                image.convert(("L" if grey else "RGB") + ("A" if has_alpha else "")), dtype=np.float64
            )
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise KDBackdoorError(
            f"trigger '{trigger_name}': '{path}' is not an image Pillow can read ({error})"
        ) from None
    if not grey and channels != 3:
        raise KDBackdoorError(
            f"trigger '{trigger_name}': colour image '{path}' cannot be applied to "
            f"{channels}-channel images (use a grey image)"
        )
    planes = torch.from_numpy(pixels / 255).reshape(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1)
    if has_alpha:
        return planes[:-1], planes[-1:]
    return planes, None


def decode_mask(data: bytes, path: Path, channels: int, trigger_name: str) -> torch.Tensor:
    """Decode a mask to (1 or ``channels``, h, w) float64 in [0, 1] (1 = replace the pixel).

    ``.npy`` files hold (h, w), (1, h, w) or (C, h, w) numbers; any other file is read as a
    grey image divided by 255.
    """
    if path.suffix.lower() != ".npy":
        return decode_image(data, path, 1, trigger_name)[0]
    try:
        mask = torch.from_numpy(np.asarray(np.load(io.BytesIO(data), allow_pickle=False), dtype=np.float64))
    except (ValueError, TypeError, OSError, EOFError) as error:
        raise KDBackdoorError(
            f"trigger '{trigger_name}': mask '{path}' is not a numeric .npy array ({error})"
        ) from None
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or mask.shape[0] not in (1, channels):
        raise KDBackdoorError(
            f"trigger '{trigger_name}': mask '{path}' has shape {tuple(mask.shape)}; expected "
            f"(H, W), (1, H, W) or ({channels}, H, W)"
        )
    if mask.numel() == 0 or mask.min() < 0 or mask.max() > 1:
        raise KDBackdoorError(f"trigger '{trigger_name}': mask '{path}' must hold values in [0, 1]")
    return mask
