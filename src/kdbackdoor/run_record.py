"""Run records: what produced a result, and checksums that tie the record to its files.

A run record is the JSON file that marks a finished run: ``metrics.json`` of ``train-teacher``
and ``distill``, ``manifest.json`` of a poisoned set. Writers add ``environment(...)`` (library
versions, device, seed, whether deterministic algorithms were on) and, once every artifact is
on disk, ``file_checksums(...)`` as the record's ``files`` section; the record itself is written
last, so a record means a complete run. ``verify_run`` recomputes the checksums.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Literal

import numpy as np
import safetensors
import torch

import kdbackdoor
from kdbackdoor.digest import sha256_file
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.numerics import numerics_record

RECORD_NAMES = ("metrics.json", "manifest.json")
"""File names a run folder's record may have, in the order ``verify_run`` looks for them."""

Status = Literal["OK", "MISMATCH", "MISSING"]

RENAMED_FIELDS = {"wall_seconds_this_session": "wall_seconds_this_run", "seconds_this_session": "seconds_this_run"}
"""Record fields renamed on 2026-12-04 (records of 0.1.0 before then use the old names): old -> new."""


def upgrade_fields(record):
    """``record`` (any JSON value) with the fields of older records renamed as ``RENAMED_FIELDS`` says,
    at any depth, so readers need to know only today's names."""
    if isinstance(record, dict):
        return {RENAMED_FIELDS.get(key, key): upgrade_fields(value) for key, value in record.items()}
    if isinstance(record, list):
        return [upgrade_fields(value) for value in record]
    return record


def read_run_record(path: str | os.PathLike) -> dict:
    """A run record (the file, or the record in a run folder), old field names upgraded."""
    return upgrade_fields(json.loads(find_record(path).read_text()))


def environment(device: torch.device | str, seed: int) -> dict:
    """Where and how a run ran: library versions, platform, device (with the GPU's name), seed,
    whether ``torch.use_deterministic_algorithms`` was on, and the precision, layout and
    compilation used (``numerics``)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "versions": {
            "kdbackdoor": kdbackdoor.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version(),
        },
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "seed": seed,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "numerics": numerics_record(device),
    }


def file_checksums(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256 hex}`` for each file ``folder/name`` (names relative, '/'-separated)."""
    folder = Path(folder)
    return {name: sha256_file(folder / name) for name in names}


@dataclass(frozen=True)
class FileCheck:
    """One recorded file compared with what is on disk now."""

    name: str
    status: Status
    expected: str
    actual: str | None


def find_record(path: str | os.PathLike) -> Path:
    """The record file for ``path``: the file itself, or the first of ``RECORD_NAMES`` in a folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in RECORD_NAMES:
            if (path / name).is_file():
                return path / name
        raise KDBackdoorError(f"{path}: no run record in it (expected {' or '.join(RECORD_NAMES)}); "
                              "an interrupted run has none until it finishes")
    raise KDBackdoorError(f"{path}: no such file or directory")


def verify_run(path: str | os.PathLike) -> tuple[Path, list[FileCheck]]:
    """Recompute the sha256 of every file listed in the record's ``files`` section.

    Returns (record path, one ``FileCheck`` per listed file). Raises ``KDBackdoorError`` when
    the record is unreadable, lists no files, or names a file outside its folder.
    """
    record_path = find_record(path)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KDBackdoorError(f"{record_path}: unreadable run record ({exc})") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not files:
        raise KDBackdoorError(f"{record_path}: the record lists no file checksums (no 'files' section); "
                              "it was written by an older version or is not a run record")
    checks = []
    for name, expected in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not isinstance(expected, str):
            raise KDBackdoorError(f"{record_path}: invalid 'files' entry {name!r}: {expected!r} "
                                  "(expected a path inside the run folder and a sha256)")
        file = record_path.parent / relative
        if not file.is_file():
            checks.append(FileCheck(name, "MISSING", expected, None))
            continue
        actual = sha256_file(file)
        checks.append(FileCheck(name, "OK" if actual == expected else "MISMATCH", expected, actual))
    return record_path, checks
