"""The registry of data-set sources: each turns a load request into decoded uint8 arrays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from kdbackdoor.registry import Registry


@dataclass(frozen=True)
class SourceRequest:
    """What ``load_dataset`` asks of a source.

    argument: the text after ``name:`` in the spec (the PATH of ``imagefolder:PATH``), else None.
    split: "train" or "test".
    data_dir: the user's folder of downloaded data sets, or None.
    cache_dir: where downloads and decoded arrays are cached.
    resize: (height, width) in pixels, or None to keep the stored size.
    download: whether a missing archive may be downloaded.
    progress: whether to show progress bars.
    """

    argument: str | None
    split: str
    data_dir: Path | None
    cache_dir: Path
    resize: tuple[int, int] | None
    download: bool
    progress: bool


class Decoded(NamedTuple):
    """One split as arrays: images uint8 (N, C, H, W) in 0..255, labels int64 (N,), class names
    in label order."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


@dataclass(frozen=True)
class Source:
    """A registered source: its name, its loader, whether the spec carries a path, and one line
    saying what it is (for ``kdbackdoor datasets``)."""

    name: str
    load: Callable[[SourceRequest], Decoded]
    takes_path: bool
    description: str = ""

    @property
    def usage(self) -> str:
        """How to write it in a spec, e.g. ``cifar10`` or ``npz:PATH``."""
        return f"{self.name}:PATH" if self.takes_path else self.name


SOURCES: Registry[Source] = Registry("data set", usage=lambda name, source: source.usage)


def register_source(
    name: str, *, takes_path: bool = False, description: str = "",
) -> Callable[[Callable[[SourceRequest], Decoded]], Callable[[SourceRequest], Decoded]]:
    """Decorator: make a loader available to ``load_dataset`` as ``name`` (or ``name:PATH``)."""
    def decorator(load: Callable[[SourceRequest], Decoded]) -> Callable[[SourceRequest], Decoded]:
        SOURCES.add(name, Source(name, load, takes_path, description))
        return load
    return decorator
