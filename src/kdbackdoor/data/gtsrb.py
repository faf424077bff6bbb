"""GTSRB (German Traffic Sign Recognition Benchmark) from its official folder layout.

Train: ``Final_Training/Images/000NN/*.ppm`` with ``GT-000NN.csv`` in each class folder.
Test: ``Final_Test/Images/*.ppm`` with ``GT-final_test.csv`` (the labelled ground truth, in
``Final_Test/Images/``, ``Final_Test/`` or the root). CSVs are semicolon-separated; labels come
from their ``ClassId`` column. Whole images are resized (not cropped to the sign's box),
like the common 32x32 versions.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from kdbackdoor.data.cache import cached_decode
from kdbackdoor.data.decode import decode_image_files
from kdbackdoor.data.source_registry import Decoded, SourceRequest, register_source
from kdbackdoor.errors import KDBackdoorError

DEFAULT_SIZE = (32, 32)
CLASSES = [str(i) for i in range(43)]
_SPLIT_FOLDERS = {"train": "Final_Training", "test": "Final_Test"}


@register_source("gtsrb", description="German traffic signs, 43 classes, the official layout in --data-dir, "
                 "resized (default 32 px)")
def load_gtsrb(request: SourceRequest) -> Decoded:
    """GTSRB: 39,209 train / 12,630 test RGB images of 43 classes, resized (default 32x32)."""
    split_dir = _split_dir(request.data_dir, request.split)
    annotations, csv_files = (
        _training_annotations(split_dir) if request.split == "train" else _test_annotations(split_dir)
    )
    if not annotations:
        raise KDBackdoorError(f"{split_dir}: the GTSRB annotation CSVs list no images")
    paths = [path for path, _ in annotations]
    labels = np.array([label for _, label in annotations], dtype=np.int64)
    size = request.resize or DEFAULT_SIZE
    identity = {"source": "gtsrb", "split_dir": str(split_dir), "resize": size}
    return cached_decode(
        request.cache_dir, identity, [*csv_files, *paths],
        lambda: Decoded(
            decode_image_files(paths, size=size, progress=request.progress,
                               description=f"decoding gtsrb {request.split}"),
            labels, list(CLASSES),
        ),
    )


def _split_dir(data_dir: Path | None, split: str) -> Path:
    """``Final_Training`` or ``Final_Test`` under data_dir or data_dir/GTSRB."""
    folder = _SPLIT_FOLDERS[split]
    if data_dir is None:
        raise KDBackdoorError(
            f"gtsrb needs data_dir: the folder holding {folder}/ (official GTSRB layout)"
        )
    for root in (data_dir, data_dir / "GTSRB"):
        if (root / folder / "Images").is_dir():
            return (root / folder).resolve()
    raise KDBackdoorError(f"{data_dir}: no {folder}/Images/ in it or in its GTSRB/ folder")


def _training_annotations(split_dir: Path) -> tuple[list[tuple[Path, int]], list[Path]]:
    """(image path, label) pairs from every class folder's GT-000NN.csv, and those CSVs."""
    class_dirs = sorted(d for d in (split_dir / "Images").iterdir() if d.is_dir())
    csv_files = [d / f"GT-{d.name}.csv" for d in class_dirs]
    return [pair for f in csv_files for pair in _read_csv(f, f.parent)], csv_files


def _test_annotations(split_dir: Path) -> tuple[list[tuple[Path, int]], list[Path]]:
    """(image path, label) pairs from GT-final_test.csv, and that CSV."""
    candidates = [split_dir / "Images", split_dir, split_dir.parent]
    for folder in candidates:
        if (folder / "GT-final_test.csv").is_file():
            csv_file = folder / "GT-final_test.csv"
            return _read_csv(csv_file, split_dir / "Images"), [csv_file]
    raise KDBackdoorError(
        f"{split_dir}: GT-final_test.csv (the labelled test ground truth) not found in "
        f"{', '.join(str(c) for c in candidates)}"
    )


def _read_csv(csv_file: Path, image_dir: Path) -> list[tuple[Path, int]]:
    try:
        with csv_file.open(newline="") as f:
            return [(image_dir / row["Filename"], int(row["ClassId"]))
                    for row in csv.DictReader(f, delimiter=";")]
    except OSError as exc:
        raise KDBackdoorError(f"{csv_file}: cannot read ({exc.strerror})") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise KDBackdoorError(
            f"{csv_file}: expected semicolon-separated columns Filename and ClassId ({exc!r})"
        ) from exc
