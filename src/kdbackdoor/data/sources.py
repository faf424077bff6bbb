"""Load a data set split by spec: ``digits``, ``cifar10``, ``cifar100``, ``gtsrb``,
``imagefolder:PATH`` or ``npz:PATH``.

Each source lives in its own module and registers itself by name; this module picks the
source, validates the request, and applies ``resize`` uniformly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

# Imported for their registration side effect: each module adds its source(s).
from kdbackdoor.data import cifar, digits, gtsrb, imagefolder, npz  # noqa: F401
from kdbackdoor.data.cache import default_cache_dir
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.data.source_registry import SOURCES, SourceRequest
from kdbackdoor.errors import KDBackdoorError

SPLITS = ("train", "test")
_RESIZE_CHUNK = 4096  # images per interpolation call, to bound float memory


def available_datasets() -> list[str]:
    """The sources as written in a spec, sorted: ``cifar10``, ..., ``imagefolder:PATH``, ``npz:PATH``."""
    return sorted(source.usage for source in SOURCES.values())


NO_FLIP_SOURCES = ("digits", "gtsrb")
"""Data sets whose images a horizontal flip turns into another class's (digits, traffic signs)."""


def default_augmentation(spec: str, resize: int | None = None) -> tuple[int, bool]:
    """(random-crop padding in px, horizontal flips) that suit a data set spec when the user sets
    neither: 1 px and no flips for the 8×8 digits (4 px crops and mirrored digits wreck a small
    teacher), an eighth of the side for the others (4 px at 32 px), flips off for traffic signs too. A poisoned-set folder counts as the data set it was made from."""
    from kdbackdoor.data.poisoned_set import MANIFEST_FILE
    manifest = Path(spec) / MANIFEST_FILE
    if manifest.is_file():  # a poisoned set: the data set it was crafted from
        try:
            import json
            recorded = json.loads(manifest.read_text()).get("dataset") or {}
            spec, resize = recorded.get("spec") or spec, resize or recorded.get("resize")
        except (OSError, ValueError):
            pass
    name = spec.partition(":")[0]
    if name == "digits":
        return 1, False
    return max(1, (resize or 32) // 8), name not in NO_FLIP_SOURCES


def dataset_record(spec: str, data_dir: str | Path | None, resize: int | None) -> dict:
    """How to load the data set again (stored in checkpoints and run records, so that ``evaluate``
    can default to it): its spec, data folder and resize."""
    return {"spec": spec, "data_dir": str(data_dir) if data_dir else None, "resize": resize}


def load_dataset(
    spec: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    resize: int | tuple[int, int] | None = None,
    download: bool = True,
    progress: bool = True,
) -> ImageDataset:
    """One split of a data set, as uint8 images (N, C, H, W) with int64 labels.

    spec: a source name, or ``name:PATH`` for path sources (see ``available_datasets``).
    split: "train" or "test".
    data_dir: where downloaded data sets live (cifar archives, the GTSRB folders).
    cache_dir: downloads and decoded-array cache; default ``$KDBACKDOOR_CACHE`` or
        ``~/.cache/kdbackdoor``.
    resize: side in pixels, or (height, width); bilinear. None keeps the stored size
        (GTSRB, whose images vary in size, then defaults to 32x32).
    download: whether a missing archive may be downloaded (checksum verified).
    progress: show progress bars (on stderr) while downloading or decoding.

    The result is named ``"<spec>:<split>"``; its meta holds ``source`` and ``split``.
    """
    name, _, argument = spec.partition(":")
    if name not in SOURCES:
        raise SOURCES.unknown(spec)
    source = SOURCES[name]
    if source.takes_path != bool(argument):
        raise KDBackdoorError(f"data set {spec!r}: write it as {source.usage}")
    if split not in SPLITS:
        raise KDBackdoorError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    size = _as_size(resize)
    request = SourceRequest(
        argument=argument or None,
        split=split,
        data_dir=Path(data_dir).expanduser() if data_dir is not None else None,
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(),
        resize=size,
        download=download,
        progress=progress,
    )
    decoded = source.load(request)
    images = torch.from_numpy(decoded.images)
    if size is not None and tuple(images.shape[-2:]) != size:
        images = resize_images(images, size)
    return ImageDataset(
        images, torch.from_numpy(decoded.labels), list(decoded.classes),
        name=f"{spec}:{split}", meta={"source": spec, "split": split},
    )


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of uint8 images (N, C, H, W) to
    ``size`` = (height, width) in pixels; uint8 out."""
    return torch.cat([
        F.interpolate(chunk.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        .round_().clamp_(0, 255).to(torch.uint8)
        for chunk in images.split(_RESIZE_CHUNK)
    ])


def _as_size(resize: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if resize is None:
        return None
    size = (resize, resize) if isinstance(resize, int) else tuple(resize)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise KDBackdoorError(f"resize must be a positive side or (height, width), got {resize!r}")
    return size
