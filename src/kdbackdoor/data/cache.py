"""Cache of decoded data sets: one safetensors file per decoded split (no pickle), written atomically.

Decoding 60,000 small JPEGs takes a while; reading the same pixels back from one file takes a
fraction of a second. An entry is keyed by what determines its content (source, resolved path,
split, resize) and by every input file's path, size and modification time, so editing, adding
or removing a file decodes again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from kdbackdoor.atomic import atomic_path
from kdbackdoor.data.source_registry import Decoded
from kdbackdoor.errors import KDBackdoorError

CACHE_ENV = "KDBACKDOOR_CACHE"
_FORMAT = 1  # bump when the stored layout changes, so old entries are not read


def default_cache_dir() -> Path:
    """``$KDBACKDOOR_CACHE`` when set, else ``~/.cache/kdbackdoor``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kdbackdoor").expanduser()


def cached_decode(
    cache_dir: Path, identity: dict, files: Sequence[str | Path], decode: Callable[[], Decoded],
) -> Decoded:
    """What ``decode()`` returns, read from ``cache_dir`` when an entry for the same input exists.

    identity: JSON-able description of everything besides ``files`` that changes the output.
    files: the input files whose path, size and modification time make up the key.
    """
    path = Path(cache_dir) / "decoded" / f"{_cache_key(identity, files)}.safetensors"
    if path.is_file():
        try:
            return _read(path)
        except (OSError, SafetensorError, KeyError, ValueError):
            pass  # an unreadable entry is decoded again and overwritten
    decoded = decode()
    with atomic_path(path) as tmp:
        save_file(
            {"images": np.ascontiguousarray(decoded.images), "labels": decoded.labels},
            str(tmp), metadata={"classes": json.dumps(decoded.classes)},
        )
    return decoded


def _cache_key(identity: dict, files: Sequence[str | Path]) -> str:
    """Hex digest of ``identity`` and each file's (path, size in bytes, mtime in ns)."""
    lines = [json.dumps([_FORMAT, identity], sort_keys=True)]
    for file in files:
        try:
            stat = os.stat(file)
        except OSError as exc:
            raise KDBackdoorError(f"{file}: cannot read ({exc.strerror})") from exc
        lines.append(f"{file}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def _read(path: Path) -> Decoded:
    with safe_open(str(path), framework="numpy") as entry:
        classes = json.loads(entry.metadata()["classes"])
        return Decoded(entry.get_tensor("images"), entry.get_tensor("labels"), classes)
