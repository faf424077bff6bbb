"""Decode image files into one uint8 array, on a thread pool (PIL releases the GIL while decoding)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from kdbackdoor.data.progress import progress_bar
from kdbackdoor.errors import KDBackdoorError

_FILES_PER_TASK = 256  # amortises thread scheduling while keeping the progress bar lively


def decode_image_files(
    paths: Sequence[str | Path], *, size: tuple[int, int] | None, progress: bool, description: str,
) -> np.ndarray:
    """Decode ``paths`` (at least one) as RGB into a uint8 array (N, 3, H, W), values 0..255.

    size: (height, width) in pixels to resize every image to (bilinear), or None to keep the
    files' own size, which must then be the same for all. Raises ``KDBackdoorError`` naming a
    file that does not decode, or two files of different sizes.
    """
    first = _decode(paths[0], size)
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)

    def decode_range(start: int, stop: int) -> int:
        for i in range(start, stop):
            image = _decode(paths[i], size)
            if image.shape != first.shape:
                raise KDBackdoorError(
                    f"images differ in size: {paths[0]} is {_size_text(first)}, {paths[i]} is "
                    f"{_size_text(image)}; pass resize to load them at one size"
                )
            out[i] = image
        return stop - start

    with progress_bar(enabled=progress) as bar, ThreadPoolExecutor() as pool:
        task = bar.add_task(description, total=len(paths))
        futures = [
            pool.submit(decode_range, start, min(start + _FILES_PER_TASK, len(paths)))
            for start in range(0, len(paths), _FILES_PER_TASK)
        ]
        try:
            for future in as_completed(futures):
                bar.advance(task, future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return out


def _decode(path: str | Path, size: tuple[int, int] | None) -> np.ndarray:
    """One file as uint8 (3, H, W)."""
    try:
        with Image.open(path) as image:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            if size is not None:
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(rgb).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise KDBackdoorError(f"{path}: cannot decode image ({exc})") from exc


def _size_text(image: np.ndarray) -> str:
    return f"{image.shape[2]}x{image.shape[1]}"
