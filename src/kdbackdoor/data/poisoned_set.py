"""Poisoned data sets on disk: ``poisoned.npz`` plus a ``manifest.json`` beside it.

The npz holds ``x`` (uint8, N×H×W×C), ``y``, ``classes`` and the provenance arrays
(``poisoned``, ``source_index``, ``original_label``), so ``npz:DIR/poisoned.npz`` also loads
it as a plain data set. The manifest (format ``kdbackdoor-poisoned-set/1``) records how it
was made: every parameter, the counts, the teacher's identity, the trigger and the
verification statistics, and the sha256 of the npz and of the other files of the folder
(``files``, checked by ``kdbackdoor verify``). It is written last, so a manifest means a
complete set.
"""

from __future__ import annotations

import datetime
import json
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import kdbackdoor
from kdbackdoor.atomic import atomic_path, write_json
from kdbackdoor.data.dataset import ImageDataset, Provenance
from kdbackdoor.digest import sha256_file
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.run_record import file_checksums

POISONED_SET_FORMAT = "kdbackdoor-poisoned-set/1"
DATA_FILE = "poisoned.npz"
MANIFEST_FILE = "manifest.json"


def save_poisoned_set(data: ImageDataset, out_dir: str | os.PathLike, manifest: dict,
                      artifacts: Sequence[str] = ()) -> Path:
    """Write ``out_dir/poisoned.npz`` and ``out_dir/manifest.json``; returns the manifest path.

    ``artifacts``: names of other files already written in ``out_dir`` (e.g. a picture of the
    poisons) whose sha256 the manifest records beside the npz's.
    """
    if data.provenance is None:
        raise KDBackdoorError("a poisoned set needs provenance")
    out_dir = Path(out_dir)
    prov = data.provenance
    with atomic_path(out_dir / DATA_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=data.images.cpu().permute(0, 2, 3, 1).numpy(), y=data.labels.cpu().numpy(),
                     classes=np.array(data.classes), poisoned=prov.poisoned.numpy(),
                     source_index=prov.source_index.numpy(), original_label=prov.original_label.numpy())
    full = {
        "format": POISONED_SET_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kdbackdoor": kdbackdoor.__version__,
        "data_file": DATA_FILE,
        "data_sha256": sha256_file(out_dir / DATA_FILE),
        "size": len(data),
        "poisoned": int(prov.poisoned.sum()),
        "classes": list(data.classes),
        **manifest,
        "files": file_checksums(out_dir, [DATA_FILE, *artifacts]),
    }
    write_json(out_dir / MANIFEST_FILE, full)
    return out_dir / MANIFEST_FILE


def is_poisoned_set(path: str | os.PathLike) -> bool:
    """True for a folder holding a manifest, or the manifest itself."""
    path = Path(path)
    return (path / MANIFEST_FILE).is_file() if path.is_dir() else path.name == MANIFEST_FILE and path.is_file()


def load_poisoned_set(path: str | os.PathLike) -> tuple[ImageDataset, dict]:
    """Load a poisoned set (its folder or manifest) with provenance; returns (data, manifest).

    The npz's sha256 must match the manifest's; arrays are read with ``allow_pickle=False``.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KDBackdoorError(f"{folder}: unreadable poisoned-set manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != POISONED_SET_FORMAT:
        raise KDBackdoorError(f"{folder / MANIFEST_FILE}: not a {POISONED_SET_FORMAT} manifest")
    data_path = folder / DATA_FILE
    if not data_path.is_file() or sha256_file(data_path) != manifest.get("data_sha256"):
        raise KDBackdoorError(f"{data_path}: missing or does not match the manifest's sha256")
    try:
        with np.load(data_path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        provenance = Provenance(torch.from_numpy(arrays["poisoned"]).bool(),
                                torch.from_numpy(arrays["source_index"]).long(),
                                torch.from_numpy(arrays["original_label"]).long())
        images = torch.from_numpy(np.ascontiguousarray(arrays["x"].transpose(0, 3, 1, 2)))
        data = ImageDataset(images, torch.from_numpy(arrays["y"]), [str(c) for c in arrays["classes"]],
                            f"poisoned:{folder}", {}, provenance)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise KDBackdoorError(f"{data_path}: unreadable poisoned set ({exc})") from None
    return data, manifest
