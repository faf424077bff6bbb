"""Triggers by name: a decorator registers a class, lookups name what is available."""

from __future__ import annotations

from typing import Callable, TypeVar

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.triggers.base import Trigger

T = TypeVar("T", bound=type[Trigger])

_TRIGGERS: dict[str, type[Trigger]] = {}


def register_trigger(name: str) -> Callable[[T], T]:
    """Class decorator: make the trigger buildable as ``name`` in specs and configs."""

    def register(cls: T) -> T:
        if name in _TRIGGERS:
            raise ValueError(f"trigger name '{name}' is registered twice")
        cls.name = name
        _TRIGGERS[name] = cls
        return cls

    return register


def trigger_class(name: str) -> type[Trigger]:
    """The class registered as ``name``; a KDBackdoorError listing the names if there is none."""
    try:
        return _TRIGGERS[name]
    except KeyError:
        raise KDBackdoorError(
            f"unknown trigger '{name}'; available: {', '.join(available_triggers())}"
        ) from None


def available_triggers() -> list[str]:
    """Names of all registered triggers, sorted."""
    return sorted(_TRIGGERS)
