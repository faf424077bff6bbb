"""CIFAR-10 and CIFAR-100 from the official python-pickle archives.

The archive is looked for in ``data_dir`` (the ``.tar.gz`` or its extracted folder), then in
the download cache (files land there only once their checksum matched), and is otherwise
downloaded with its checksum verified. The batches are
pickles by definition; they are read with an unpickler that only rebuilds builtin containers
and NumPy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdbackdoor.data.cache import cached_decode
from kdbackdoor.data.download import ARCHIVES, download
from kdbackdoor.data.source_registry import Decoded, SourceRequest, register_source
from kdbackdoor.errors import KDBackdoorError

IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarLayout:
    """Where one archive keeps its batches and which pickle keys hold labels and class names."""

    folder: str
    batches: dict[str, tuple[str, ...]]
    meta_file: str
    names_key: bytes
    labels_key: bytes


LAYOUTS: dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        "batches.meta", b"label_names", b"labels",
    ),
    "cifar100": CifarLayout(  # fine labels: the 100-class task
        "cifar-100-python", {"train": ("train",), "test": ("test",)},
        "meta", b"fine_label_names", b"fine_labels",
    ),
}


@register_source("cifar10", description="CIFAR-10, 32×32 RGB, 10 classes; the python archive from --data-dir, "
                 "else downloaded with its checksum")
def load_cifar10(request: SourceRequest) -> Decoded:
    """CIFAR-10: 50,000 train / 10,000 test RGB images, 32x32, 10 classes."""
    return _load_cifar("cifar10", request)


@register_source("cifar100", description="CIFAR-100, 32×32 RGB, 100 classes; the python archive from --data-dir, "
                 "else downloaded with its checksum")
def load_cifar100(request: SourceRequest) -> Decoded:
    """CIFAR-100: 50,000 train / 10,000 test RGB images, 32x32, 100 fine classes."""
    return _load_cifar("cifar100", request)


def _load_cifar(name: str, request: SourceRequest) -> Decoded:
    layout = LAYOUTS[name]
    location = _locate(name, request)
    members = (*layout.batches[request.split], layout.meta_file)
    files = [location / m for m in members] if location.is_dir() else [location]
    # The stored size is fixed (32x32); load_dataset resizes afterwards, so resize is no key.
    identity = {"source": name, "split": request.split, "location": str(location.resolve())}
    return cached_decode(
        request.cache_dir, identity, files, lambda: _decode(layout, location, members),
    )


def _locate(name: str, request: SourceRequest) -> Path:
    """The extracted folder or the archive: in data_dir, else in the download cache, else fetched."""
    remote, layout = ARCHIVES[name], LAYOUTS[name]
    downloads = request.cache_dir / "downloads"
    candidates = [downloads / remote.filename]
    if request.data_dir is not None:
        candidates[:0] = [request.data_dir / layout.folder, request.data_dir / remote.filename]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    if not request.download:
        where = f"{request.data_dir} or {downloads}" if request.data_dir else str(downloads)
        raise KDBackdoorError(
            f"{name}: {remote.filename} (or its extracted {layout.folder}/ folder) not found in "
            f"{where}; put it in data_dir or allow downloading"
        )
    return download(remote, downloads, progress=request.progress)


def _decode(layout: CifarLayout, location: Path, members: tuple[str, ...]) -> Decoded:
    raw = _read_members(location, layout.folder, members)
    meta = _unpickle(raw[layout.meta_file], location, layout.meta_file)
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names_key]]
    except (KeyError, TypeError) as exc:
        raise KDBackdoorError(f"{location}: {layout.meta_file} lacks class names") from exc
    batches = [
        _batch_arrays(_unpickle(raw[m], location, m), layout.labels_key, f"{location}: {m}")
        for m in members if m != layout.meta_file
    ]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return Decoded(images, labels, classes)


def _read_members(location: Path, folder: str, members: tuple[str, ...]) -> dict[str, bytes]:
    """The raw bytes of each member, from the extracted folder or in one pass over the archive."""
    if location.is_dir():
        return {m: (location / m).read_bytes() for m in members}
    wanted = {f"{folder}/{m}": m for m in members}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(location, "r:gz") as archive:
            for entry in archive:
                if entry.name in wanted and entry.isfile():
                    found[wanted[entry.name]] = archive.extractfile(entry).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise KDBackdoorError(f"{location}: not a readable .tar.gz archive ({exc})") from exc
    missing = [name for name in wanted if wanted[name] not in found]
    if missing:
        raise KDBackdoorError(f"{location}: archive lacks {', '.join(missing)}")
    return found


def _batch_arrays(batch: object, labels_key: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (n, 3, 32, 32) and labels int64 (n,) of one unpickled batch."""
    try:
        data, labels = batch[b"data"], np.asarray(batch[labels_key], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise KDBackdoorError(f"{where}: not a CIFAR batch (no data or labels)") from exc
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8
            or data.shape != (len(labels), int(np.prod(IMAGE_SHAPE)))):
        raise KDBackdoorError(
            f"{where}: expected uint8 data of shape ({len(labels)}, 3072), got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        )
    return data.reshape(-1, *IMAGE_SHAPE), labels


# NumPy's array-rebuilding function, wherever this NumPy version keeps it.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds builtin containers, bytes, strings, numbers and NumPy arrays; refuses anything else."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle(raw: bytes, location: Path, member: str) -> object:
    try:
        # encoding="bytes": the official batches are Python 2 pickles whose keys are byte strings.
        return _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise KDBackdoorError(f"{location}: {member} is not a CIFAR pickle ({exc})") from exc
