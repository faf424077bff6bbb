"""Foreign parameter namings: how other code bases name the weights of kdbackdoor's architectures.

A ``Naming`` rewrites a key of a foreign state dict (e.g. torchvision's ``layer1.0.conv1.weight``)
into kdbackdoor's key for the same tensor (``backbone.stages.0.0.conv1.weight``) by a fixed list of
regular-expression rules applied in order, each at most once. Architectures list the namings they
accept when they register (``kdbackdoor.models.registry.register``); a naming may also carry the
input size and normalisation its source trains with, used when the caller gives none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Union

Replacement = Union[str, Callable[["re.Match[str]"], str]]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def cifar_normalisation(num_classes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) that CIFAR code bases normalise with: CIFAR-100's statistics
    for a 100-class model, CIFAR-10's otherwise."""
    return (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)


@dataclass(frozen=True)
class Naming:
    """A key naming: ``rename`` maps a foreign key onto kdbackdoor's key for the same tensor.

    ``normalisation(num_classes) -> (mean, std)`` and ``input_size`` (H, W) describe what the
    source trains with (pixel [0, 1] space); None means "the architecture's own default".
    """

    name: str
    description: str
    rules: tuple[tuple[str, Replacement], ...] = ()
    normalisation: Callable[[int], tuple[tuple[float, ...], tuple[float, ...]]] | None = None
    input_size: tuple[int, int] | None = None

    def rename(self, key: str) -> str:
        for pattern, replacement in self.rules:
            key = re.sub(pattern, replacement, key, count=1)
        return key


NATIVE = Naming("kdbackdoor", "kdbackdoor's own names (backbone.stem, backbone.stages.<i>, backbone.fc)")


def numbered(prefix: str, offset: int = 1) -> Callable[["re.Match[str]"], str]:
    """A replacement turning the match's first group, a 1-based number, into ``prefix<n - offset>.``
    (``layer3.`` -> ``backbone.stages.2.``)."""
    return lambda match: f"{prefix}{int(match[1]) - offset}."


def indexed(table: dict[int, str]) -> Callable[["re.Match[str]"], str]:
    """A replacement looking the match's first group (an index) up in ``table``; indices not in
    the table are left as they are, so they surface as unexpected keys."""
    return lambda match: table.get(int(match[1]), match[0])
