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
MAX_CLASSES = 100_000
"""Most classes a file may have (labels 0..MAX_CLASSES-1); a wild label must not size anything."""


@register_source("npz", takes_path=True, description="arrays x (uint8 N×H×W[×C]) and y (labels) in PATH, or "
                 "PATH/train.npz and PATH/test.npz")
def load_npz(request: SourceRequest) -> Decoded:
    """The arrays of the PATH of ``npz:PATH`` (see the module docstring)."""
    path = Path(request.argument).expanduser()
    if path.is_dir():
        path = path / f"{request.split}.npz"
    if not path.is_file():
        raise KDBackdoorError(f"{path}: npz file not found")
    arrays = _read(path)
    x = _checked_images(path, arrays["x"])
    names = _class_names(path, arrays["classes"]) if "classes" in arrays else None
    labels = _labels(path, arrays["y"], len(x), names)  # before anything is sized by the labels
    classes = names if names is not None else [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
    return Decoded(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), labels, classes)


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


def _checked_images(path: Path, x: np.ndarray) -> np.ndarray:
    """``x`` checked, as a uint8 (N, H, W, C) view."""
    if x.dtype != np.uint8:
        raise KDBackdoorError(f"{path}: x must be uint8 (pixel values 0..255), got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in _CHANNELS:
        raise KDBackdoorError(
            f"{path}: x must have shape (N, H, W, C) with C in {_CHANNELS} or (N, H, W), "
            f"got {x.shape}"
        )
    return x


def _class_names(path: Path, classes: np.ndarray) -> list[str]:
    if classes.ndim != 1 or not 0 < classes.size <= MAX_CLASSES or classes.dtype.kind not in "US":
        raise KDBackdoorError(f"{path}: classes must be a 1-D array of 1 to {MAX_CLASSES} names (strings), "
                              f"got {classes.dtype} {classes.shape}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in classes]


def _labels(path: Path, y: np.ndarray, count: int, classes: list[str] | None) -> np.ndarray:
    """``y`` checked against the image count and the class range, as int64."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise KDBackdoorError(f"{path}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != count:
        raise KDBackdoorError(f"{path}: x holds {count} images but y {len(y)} labels")
    if y.size and y.min() < 0:
        raise KDBackdoorError(f"{path}: y holds negative labels (smallest {y.min()})")
    limit = len(classes) if classes is not None else MAX_CLASSES
    if y.size and y.max() >= limit:
        where = (f"the file names {limit} classes" if classes is not None
                 else f"labels must be below {MAX_CLASSES} (add a `classes` array to name more)")
        raise KDBackdoorError(f"{path}: sample {int(y.argmax())} has label {y.max()}, but {where}")
    return y.astype(np.int64)
