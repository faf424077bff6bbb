"""Remote archives the toolkit knows, and downloading them with checksum verification (pooch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from kdbackdoor.data.progress import progress_bar
from kdbackdoor.errors import KDBackdoorError


@dataclass(frozen=True)
class RemoteFile:
    """A file to download: its name on disk, its URL, and its checksum as ``"md5:<hex>"`` or
    ``"sha256:<hex>"``."""

    filename: str
    url: str
    known_hash: str


# Looked up at call time, so tests (and mirrors) can replace an entry.
ARCHIVES: dict[str, RemoteFile] = {
    "cifar10": RemoteFile(
        "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5:c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": RemoteFile(
        "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5:eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def download(remote: RemoteFile, directory: Path, *, progress: bool = True) -> Path:
    """Download ``remote`` into ``directory``, verify its checksum, and return its path.

    A file already there with the right checksum is kept as is. On a network failure or a
    checksum mismatch, raise ``KDBackdoorError`` and leave no file of that name behind.
    """
    import pooch  # only where something is downloaded: offline machines run without it
    target = Path(directory) / remote.filename
    try:
        with progress_bar(enabled=progress, in_bytes=True) as bar:
            pooch.retrieve(
                remote.url, known_hash=remote.known_hash, fname=remote.filename,
                path=directory, progressbar=_PoochBar(bar, f"downloading {remote.filename}"),
            )
    except ValueError as exc:  # pooch's checksum mismatch
        target.unlink(missing_ok=True)
        raise KDBackdoorError(
            f"{remote.url}: downloaded file does not match checksum {remote.known_hash}; "
            f"nothing was kept ({exc})"
        ) from exc
    except OSError as exc:  # network errors (requests' exceptions are OSErrors) and disk errors
        target.unlink(missing_ok=True)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KDBackdoorError(
            f"{remote.url}: download failed ({reason}). Offline? Fetch {remote.filename} elsewhere and point "
            f"--data-dir (data.data_dir in a config) at the folder holding it or its unpacked files, or use "
            f"--dataset imagefolder:PATH for a local copy as image folders") from exc
    return target


class _PoochBar:
    """The tqdm-like object pooch drives (``total``, ``update``, ``reset``, ``close``), drawn
    with rich."""

    def __init__(self, bar: Progress, description: str):
        self._bar = bar
        self._task = bar.add_task(description, total=None)
        self._total: float | None = None

    @property
    def total(self) -> float | None:
        return self._total

    @total.setter
    def total(self, value: float) -> None:
        self._total = value or None  # a server that sends no length gives 0
        self._bar.update(self._task, total=self._total)

    def update(self, n: float) -> None:
        self._bar.advance(self._task, n)

    def reset(self) -> None:
        self._bar.reset(self._task, total=self._total)

    def close(self) -> None:
        """Nothing to do: the ``progress_bar`` around the download closes the display."""
