"""Atomic file writes and locked appends.

Whole files are written to a temporary name in the same folder, flushed to disk, then renamed:
a crash or a full disk leaves either the old file or no file, never a half-written one.
Shared append-only files (an index of runs that several processes add to) are appended one
whole line at a time under an exclusive ``fcntl.flock`` lock (POSIX only).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kdbackdoor import stop_points


TEMPORARY_GLOB = ".*.tmp"
"""What ``atomic_path``'s temporary names look like: ``.<name>.<random>.tmp``."""

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import, while no other thread can be creating files


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be as readable as any file
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # Flush the data before the rename, so a power loss cannot leave the new name empty.
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        stop_points.reached("atomic-write")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries a killed writer left in ``folder`` and its subfolders; return them.

    Only for a folder one run owns (a resumed run's output): in a shared folder another process
    may be writing one of them right now.
    """
    folder = Path(folder)
    stale = sorted(folder.rglob(TEMPORARY_GLOB)) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write raw bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock tied to ``path`` for the block; other holders wait until it ends.

    The lock lives on a sibling file ``<path>.lock`` (created if needed, never removed, so two
    processes can never lock two different inodes), is advisory (only code that calls
    ``locked`` is held back) and is released by the kernel if the holder dies, even by SIGKILL.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` plus a newline to ``path`` under :func:`locked`, in one write, then fsync.

    A writer killed mid-append can leave a final line without its newline; the next append,
    holding the lock, cuts that torn tail off first, so every line in the file is whole.
    ``line`` must not contain a newline.
    """
    if "\n" in line:
        raise ValueError("append_line takes one line; it contains a newline")
    path = Path(path)
    with locked(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.ftruncate(fd, _end_of_last_line(fd, size))
            data = (line + "\n").encode()
            written = os.write(fd, data)
            if written != len(data):  # a full disk: undo the partial line, then report
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            os.fsync(fd)
        finally:
            os.close(fd)


def _end_of_last_line(fd: int, size: int) -> int:
    """Byte offset just past the last newline in the first ``size`` bytes of ``fd`` (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        cut = os.pread(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append ``record`` as one JSON line to ``path`` (see :func:`append_line`)."""
    append_line(path, json.dumps(record, sort_keys=False, default=str))


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Every whole JSON line of ``path`` (a torn final line, from a killed writer, is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]
