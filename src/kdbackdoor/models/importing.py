"""Importing a foreign model: read it once, check it, and write it in kdbackdoor's format.

The sidecar's metadata records under ``imported_from`` where the weights came from (path or hub
repository and commit), the source file's sha256, the naming and the full key map used, and
where the normalisation came from, so that the imported checkpoint can be traced back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.checkpoint import load_checkpoint, save_checkpoint

MODEL_FILE = "model.safetensors"


def import_model(
    source: str | os.PathLike, out_dir: str | os.PathLike, *, arch: str | None = None,
    num_classes: int | None = None, in_channels: int | None = None, input_size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    classes: list[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write ``out_dir/model.safetensors`` and its sidecar from ``source`` (anything
    ``load_checkpoint`` reads); returns the weights path and the sidecar. Nothing is written
    unless the source loads and checks out; an existing checkpoint in ``out_dir`` is refused."""
    out_dir = Path(out_dir)
    target = out_dir / MODEL_FILE
    if target.exists() or target.with_suffix(".json").exists():
        raise KDBackdoorError(f"{out_dir} already holds a model; choose another --out or delete it first")
    model, config = load_checkpoint(source, arch=arch, num_classes=num_classes, in_channels=in_channels,
                                    input_size=input_size, mean=mean, std=std)
    classes = classes if classes is not None else config.get("classes")
    if classes is not None and len(classes) != model.num_classes:
        raise KDBackdoorError(f"{len(classes)} class names given for a model with {model.num_classes} classes")
    imported = config.get("source") or {"path": str(source), "naming": "kdbackdoor", "note": "already a kdbackdoor checkpoint"}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(model, target, classes=classes, metadata={"imported_from": {**imported, "source": str(source)}})
    _, sidecar = load_checkpoint(path)  # what was written reads back
    return path, sidecar
