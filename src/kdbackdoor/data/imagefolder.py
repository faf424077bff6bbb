"""Images sorted into class folders: ``ROOT/<class>/<image>``, any format PIL reads.

Class names are the sorted folder names, which gives the label order. If ROOT holds ``train/``
and ``test/`` folders, the split picks one; otherwise ROOT itself is returned for either split.
Images are converted to RGB; without ``resize`` they must all have the same size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from kdbackdoor.data.cache import cached_decode
from kdbackdoor.data.decode import decode_image_files
from kdbackdoor.data.source_registry import Decoded, SourceRequest, register_source
from kdbackdoor.errors import KDBackdoorError

IMAGE_SUFFIXES = frozenset(Image.registered_extensions())  # lower-case, with the dot


@register_source("imagefolder", takes_path=True, description="class sub-folders of images in PATH/train and "
                 "PATH/test (any format PIL reads); --resize for mixed sizes")
def load_imagefolder(request: SourceRequest) -> Decoded:
    """The images under the PATH of ``imagefolder:PATH`` (see the module docstring)."""
    root = _class_root(Path(request.argument).expanduser(), request.split)
    classes = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise KDBackdoorError(f"{root}: no class folders in it (expected ROOT/<class>/<image>)")
    files = [_image_files(root / name) for name in classes]
    paths = [path for class_files in files for path in class_files]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(f) for f in files])
    identity = {"source": "imagefolder", "root": str(root), "resize": request.resize}
    return cached_decode(
        request.cache_dir, identity, paths,
        lambda: Decoded(
            decode_image_files(paths, size=request.resize, progress=request.progress,
                               description=f"decoding {root}"),
            labels, classes,
        ),
    )


def _class_root(path: Path, split: str) -> Path:
    if not path.is_dir():
        raise KDBackdoorError(f"{path}: image folder not found")
    if (path / "train").is_dir() and (path / "test").is_dir():
        path = path / split
    return path.resolve()


def _image_files(class_dir: Path) -> list[str]:
    """The image files directly in ``class_dir``, sorted by name; an error when there are none.

    Plain strings, not ``Path``s: building 60,000 ``Path`` objects costs more than the cached load.
    """
    paths = sorted(
        entry.path for entry in os.scandir(class_dir)
        if entry.is_file() and not entry.name.startswith(".")
        and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise KDBackdoorError(f"{class_dir}: class folder holds no image files")
    return paths
