"""Architectures by name: each registers a backbone builder with ``@register(name, ...)``.

An architecture also records the input size and normalisation of the models it usually comes
with (ImageNet statistics at 224 px for the torchvision layouts, 0.5 at 32 px for the CIFAR
nets trained here), the smallest input it can take, and the foreign key namings that map onto
its parameters (see ``kdbackdoor.models.naming``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.backbone import Backbone
from kdbackdoor.models.classifier import Classifier
from kdbackdoor.registry import Registry

if TYPE_CHECKING:
    from kdbackdoor.models.naming import Naming

BackboneBuilder = Callable[[int, int], Backbone]
"""Builds a backbone from (num_classes, in_channels)."""

MIN_INPUT_SIZE = 8
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    """What ``build_model`` knows about one architecture besides its builder.

    ``input_size`` (H, W) and ``mean``/``std`` (pixel [0, 1] space) are the defaults when a
    caller gives none; ``min_input_size`` is the smallest side the network can take;
    ``namings`` are the foreign state-dict namings that load onto it.
    """

    builder: BackboneBuilder
    input_size: tuple[int, int] = (32, 32)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    min_input_size: int = MIN_INPUT_SIZE
    min_input_reason: str = ""
    namings: tuple["Naming", ...] = field(default=())


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")


def register(
    name: str, *, input_size: tuple[int, int] = (32, 32), mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None, min_input_size: int = MIN_INPUT_SIZE, min_input_reason: str = "",
    namings: Sequence["Naming"] = (),
) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make the backbone builder available to ``build_model`` as ``name``."""

    def decorate(builder: BackboneBuilder) -> BackboneBuilder:
        ARCHITECTURES.add(name, ArchSpec(
            builder, tuple(input_size), tuple(mean) if mean else None, tuple(std) if std else None,
            min_input_size, min_input_reason, tuple(namings),
        ))
        return builder

    return decorate


def available_architectures() -> list[str]:
    """Registered architecture names, sorted."""
    return ARCHITECTURES.names()


def arch_spec(arch: str) -> ArchSpec:
    """The registered description of ``arch``; unknown names raise ``KDBackdoorError``."""
    return ARCHITECTURES[arch]


def _check_positive_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KDBackdoorError(f"{what} must be a positive integer, got {value!r}")


def _per_channel(what: str, values: Sequence[float] | None, default: Sequence[float] | None,
                 in_channels: int) -> list[float]:
    if values is None:
        # a source default for another channel count (ImageNet RGB on grey input) does not apply
        values = default if default is not None and len(default) == in_channels else [0.5] * in_channels
    values = [float(v) for v in values]
    if len(values) != in_channels:
        raise KDBackdoorError(f"{what} needs {in_channels} values (one per channel), got {values}")
    return values


def build_model(
    arch: str, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
) -> Classifier:
    """A freshly initialised ``Classifier`` (train mode) for pixel-space input.

    ``input_size`` (H, W) defaults to the architecture's usual size; ``mean``/``std`` are the
    per-channel normalisation applied inside the model to pixels in [0, 1] (default: the
    architecture's source normalisation, else 0.5 each). Initialisation follows the global
    torch seed.
    """
    spec = arch_spec(arch)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    input_size = spec.input_size if input_size is None else tuple(input_size)
    if len(input_size) != 2:
        raise KDBackdoorError(f"input_size must be (height, width), got {input_size!r}")
    for side in input_size:
        _check_positive_int("input_size", side)
        if side < spec.min_input_size:
            reason = f" ({spec.min_input_reason})" if spec.min_input_reason else ""
            raise KDBackdoorError(
                f"{arch} cannot take a {input_size[0]}x{input_size[1]} input: it needs at least "
                f"{spec.min_input_size} px a side{reason}"
            )
    std = _per_channel("std", std, spec.std, in_channels)
    if min(std) <= 0:
        raise KDBackdoorError(f"std must be positive, got {std}")
    return Classifier(
        spec.builder(num_classes, in_channels), arch=arch, num_classes=num_classes,
        in_channels=in_channels, input_size=(int(input_size[0]), int(input_size[1])),
        mean=_per_channel("mean", mean, spec.mean, in_channels), std=std,
    )
