"""Rich progress bars for long data-set work (decoding files, downloading archives)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def progress_bar(*, enabled: bool, in_bytes: bool = False) -> Progress:
    """A transient bar on stderr (stdout stays clean for piped output); a no-op when disabled.

    ``in_bytes`` shows sizes and transfer speed instead of an item count.
    """
    counter = (DownloadColumn(), TransferSpeedColumn()) if in_bytes else (MofNCompleteColumn(),)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), *counter, TimeRemainingColumn(),
        console=Console(stderr=True), transient=True, disable=not enabled,
    )
