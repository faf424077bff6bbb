"""Triggers by name: a decorator registers a class, lookups name what is available."""

from __future__ import annotations

from kdbackdoor.registry import Registry
from kdbackdoor.triggers.base import Trigger

TRIGGERS: Registry[type[Trigger]] = Registry("trigger", names_items=True)
register_trigger = TRIGGERS.register
"""Class decorator: ``@register_trigger("name")`` makes the trigger buildable as ``name`` in specs and configs."""


def trigger_class(name: str) -> type[Trigger]:
    """The class registered as ``name``; a KDBackdoorError listing the names if there is none."""
    return TRIGGERS[name]


def available_triggers() -> list[str]:
    """Names of all registered triggers, sorted."""
    return TRIGGERS.names()
