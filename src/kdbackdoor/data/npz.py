"""Arrays in a NumPy ``.npz`` file: ``x`` uint8 (N, H, W, C) or (N, H, W), ``y`` integer labels,
optionally ``classes`` (names in label order). A directory stands for its ``train.npz`` /
``test.npz``. Read with ``allow_pickle=False``: an ``.npz`` cannot run code."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from kdbackdoor.data.source_registry import Decoded, SourceRequest, register_source
from kdbackdoor.errors import KDBackdoorError

_CHANNELS = (1, 3)


@register_source("npz", takes_path=True)
def load_npz(request: SourceRequest) -> Decoded:
    """The arrays of the PATH of ``npz:PATH`` (see the module docstring)."""
    path = Path(request.argument).expanduser()
    if path.is_dir():
        path = path / f"{request.split}.npz"
    if not path.is_file():
        raise KDBackdoorError(f"{path}: npz file not found")
    arrays = _read(path)
    images, labels = _images(path, arrays["x"]), _labels(path, arrays["y"])
    if len(images) != len(labels):
        raise KDBackdoorError(f"{path}: x holds {len(images)} images but y {len(labels)} labels")
    if "classes" in arrays:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in arrays["classes"].ravel()]
    else:
        classes = [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
    return Decoded(images, labels, classes)


def _read(path: Path) -> dict[str, np.ndarray]:
    """All arrays of the file, each read in full (so a truncated member fails here)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise KDBackdoorError(f"{path}: not a readable .npz file ({exc})") from exc
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise KDBackdoorError(
            f"{path}: missing array(s) {', '.join(missing)}; found {', '.join(arrays) or 'none'}"
        )
    return arrays


def _images(path: Path, x: np.ndarray) -> np.ndarray:
    """``x`` as uint8 (N, C, H, W)."""
    if x.dtype != np.uint8:
        raise KDBackdoorError(f"{path}: x must be uint8 (pixel values 0..255), got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in _CHANNELS:
        raise KDBackdoorError(
            f"{path}: x must have shape (N, H, W, C) with C in {_CHANNELS} or (N, H, W), "
            f"got {x.shape}"
        )
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _labels(path: Path, y: np.ndarray) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise KDBackdoorError(f"{path}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.size and y.min() < 0:
        raise KDBackdoorError(f"{path}: y holds negative labels (smallest {y.min()})")
    return y.astype(np.int64)
