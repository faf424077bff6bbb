"""Architectures by name: each registers a backbone builder with ``@register(name)``."""

from __future__ import annotations

from typing import Callable, Sequence

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.backbone import Backbone
from kdbackdoor.models.classifier import Classifier

BackboneBuilder = Callable[[int, int], Backbone]
"""Builds a backbone from (num_classes, in_channels)."""

MIN_INPUT_SIZE = 8
_BUILDERS: dict[str, BackboneBuilder] = {}


def register(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make the backbone builder available to ``build_model`` as ``name``."""

    def decorate(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _BUILDERS:
            raise ValueError(f"architecture {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return decorate


def available_architectures() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_BUILDERS)


def _check_positive_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KDBackdoorError(f"{what} must be a positive integer, got {value!r}")


def _per_channel(what: str, values: Sequence[float] | None, in_channels: int) -> list[float]:
    if values is None:
        return [0.5] * in_channels
    values = [float(v) for v in values]
    if len(values) != in_channels:
        raise KDBackdoorError(f"{what} needs {in_channels} values (one per channel), got {values}")
    return values


def build_model(
    arch: str, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] = (32, 32),
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
) -> Classifier:
    """A freshly initialised ``Classifier`` (train mode) for pixel-space input.

    ``mean``/``std`` are the per-channel normalisation applied inside the model to pixels in
    [0, 1] (default 0.5 each). Initialisation follows the global torch seed.
    """
    if arch not in _BUILDERS:
        raise KDBackdoorError(
            f"unknown architecture {arch!r}; known: {', '.join(available_architectures())}"
        )
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    if len(input_size) != 2:
        raise KDBackdoorError(f"input_size must be (height, width), got {input_size!r}")
    for side in input_size:
        _check_positive_int("input_size", side)
        if side < MIN_INPUT_SIZE:
            raise KDBackdoorError(f"input_size must be at least {MIN_INPUT_SIZE} px, got {input_size}")
    std = _per_channel("std", std, in_channels)
    if min(std) <= 0:
        raise KDBackdoorError(f"std must be positive, got {std}")
    return Classifier(
        _BUILDERS[arch](num_classes, in_channels), arch=arch, num_classes=num_classes,
        in_channels=in_channels, input_size=(int(input_size[0]), int(input_size[1])),
        mean=_per_channel("mean", mean, in_channels), std=std,
    )
