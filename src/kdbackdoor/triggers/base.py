"""The trigger interface: a seeded, vectorised transform of batches of pixel-space images.

A trigger is built for one image shape (C, H, W). Its patterns are generated once, on CPU
from the trigger's seed (so they are identical on every machine), and copied to each
device/dtype the first time a batch arrives there.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from kdbackdoor.errors import KDBackdoorError

ImageShape = tuple[int, int, int]


class TriggerParams(BaseModel):
    """A trigger's parameters: unknown names are refused, text values ("3", "0.2") are coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Trigger(ABC):
    """A transform of (N, C, H, W) float images in [0, 1] that plants a backdoor trigger.

    Subclasses set ``Params`` and implement ``_build`` (CPU tensors, computed once) and
    ``_apply`` (receives the batch and those tensors on the batch's device and dtype).
    """

    name: ClassVar[str] = ""  # set by @register_trigger
    Params: ClassVar[type[TriggerParams]] = TriggerParams
    positional: ClassVar[str | None] = None  # parameter written as NAME:VALUE in spec strings

    def __init__(self, image_shape: ImageShape, seed: int = 0, **params: Any) -> None:
        self.image_shape = _checked_image_shape(image_shape, self.name)
        self.seed = _checked_seed(seed, self.name)
        self.params = self._validated(params)
        self._patterns = self._build()  # built now so that a misfit fails at construction
        self._on_device: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    @abstractmethod
    def _build(self) -> dict[str, torch.Tensor]:
        """The trigger's patterns, as float64 CPU tensors."""

    @abstractmethod
    def _apply(self, x: torch.Tensor, **patterns: torch.Tensor) -> torch.Tensor:
        """Triggered batch (clamping to [0, 1] happens in ``apply``)."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return a new tensor: the batch ``x`` (N, C, H, W, pixel space [0, 1]) with the trigger."""
        self._check_batch(x)
        return self._apply(x, **self._patterns_like(x)).clamp(0.0, 1.0)

    __call__ = apply

    def changed_mask(self) -> torch.Tensor | None:
        """Bool (H, W) map of the pixels a local trigger may change; None for full-image triggers."""
        return None

    def config(self) -> dict[str, Any]:
        """The full definition as JSON-serialisable data; ``build_trigger(config)`` rebuilds it."""
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "seed": self.seed,
            "params": self.params.model_dump(mode="json"),
        }

    def describe(self) -> str:
        """One line for humans: name, parameters, image shape and seed."""
        values = {key: getattr(self.params, key) for key, field in self.Params.model_fields.items()
                  if field.repr}
        shown = ", ".join(f"{key}={format_value(value)}" for key, value in values.items()
                          if value is not None)
        shape = "x".join(map(str, self.image_shape))
        return f"{self.name}({shown}) for {shape} images, seed {self.seed}"

    def __repr__(self) -> str:
        return self.describe()

    def _generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with the trigger's seed (same numbers on every device)."""
        return torch.Generator().manual_seed(self.seed)

    def _validated(self, params: dict[str, Any]) -> TriggerParams:
        try:
            return self.Params.model_validate(params)
        except ValidationError as error:
            problems = "; ".join(_describe_problem(problem) for problem in error.errors())
            allowed = ", ".join(self.Params.model_fields) or "none"
            raise KDBackdoorError(
                f"trigger '{self.name}': {problems} (parameters: {allowed})"
            ) from None

    def _check_batch(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise KDBackdoorError(
                f"trigger '{self.name}' expects float images in [0, 1], got {kind}"
            )
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise KDBackdoorError(
                f"trigger '{self.name}' was built for batches of shape (N, "
                f"{', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}"
            )

    def _patterns_like(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._on_device:
            self._on_device[key] = {
                name: pattern.to(device=x.device, dtype=x.dtype)
                for name, pattern in self._patterns.items()
            }
        return self._on_device[key]


def format_value(value: Any) -> str:
    """A parameter value as short text (floats to 4 significant digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _integer(value: Any) -> int:
    """``value`` as an int (NumPy integers too); TypeError for bools and non-integers."""
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return operator.index(value)


def _checked_seed(seed: Any, trigger_name: str) -> int:
    try:
        return _integer(seed)
    except TypeError:
        raise KDBackdoorError(
            f"trigger '{trigger_name}': seed must be an integer, got {seed!r}"
        ) from None


def _checked_image_shape(image_shape: Any, trigger_name: str) -> ImageShape:
    try:
        shape = tuple(_integer(n) for n in image_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise KDBackdoorError(
            f"trigger '{trigger_name}': image_shape must be three positive integers "
            f"(C, H, W), got {image_shape!r}"
        )
    return shape  # type: ignore[return-value]


def _describe_problem(problem: dict[str, Any]) -> str:
    """One pydantic validation problem as a short phrase naming the parameter."""
    field = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        return f"unknown parameter '{field}'"
    if problem["type"] == "missing":
        return f"parameter '{field}' is required"
    if problem["type"] == "value_error":  # raised by a model validator: its message says it all
        return str(problem["ctx"]["error"])
    return f"{field}={problem['input']!r}: {problem['msg']}"
