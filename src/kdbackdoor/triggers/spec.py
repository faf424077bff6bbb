"""Building triggers from command-line spec strings and from saved configs."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.triggers.base import ImageShape, Trigger, format_value
from kdbackdoor.triggers.registry import available_triggers, trigger_class

_SYNTAX = """\
Trigger specs:
  NAME                      e.g. badnets-square
  NAME:key=value,key=value  e.g. badnets-square:size=3,corner=top-left
  image:PATH?key=value&...  e.g. image:triggers/blend.png?mode=blend&alpha=0.2
Patch lengths (size, offset, cell, radius, width) are pixels at 32x32, scaled
per axis to the data: floor(length * side / 32 + 0.5), at least 1 px for sizes.
Pixel values are in [0, 1]. image modes: patch (where alpha / non-zero), mask
(mask=FILE.npy|FILE.png), blend (alpha, default 0.2), add, add-renormalize;
resize=antialias|nearest."""

_CONFIG_KEYS = ("name", "image_shape", "seed", "params")


def describe_syntax() -> str:
    """Help text: the spec syntax and every registered trigger with its parameter defaults."""
    lines = [_SYNTAX, "Triggers:"]
    for name in available_triggers():
        cls = trigger_class(name)
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        defaults = " ".join(
            f"{key}={format_value(field.default)}" if field.default is not None else key
            for key, field in cls.Params.model_fields.items()
            if field.repr and key != cls.positional
        )
        lines.append(f"  {name:<15} {defaults}")
        lines.append(textwrap.fill(summary, width=78, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6, break_on_hyphens=False))
    return "\n".join(lines)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split a spec string into (trigger name, {parameter: text value})."""
    name, _, rest = spec.strip().partition(":")
    cls = trigger_class(name.strip())
    if cls.positional is None:
        return cls.name, _parse_options(rest, ",", spec)
    value, _, options = rest.partition("?")
    if not value.strip():
        raise KDBackdoorError(
            f"trigger spec '{spec}': write {cls.name}:{cls.positional.upper()}?key=value&key=value"
        )
    params = _parse_options(options, "&", spec)
    if cls.positional in params:
        raise KDBackdoorError(f"trigger spec '{spec}': {cls.positional} is given twice")
    return cls.name, {cls.positional: value.strip(), **params}


def build_trigger(
    spec: str | Mapping[str, Any], image_shape: ImageShape | None = None, seed: int = 0
) -> Trigger:
    """Build a trigger from a spec string (needs ``image_shape``) or from ``Trigger.config()``.

    A config carries its own image shape and seed; passing a different ``image_shape``
    raises, so a trigger is never silently rebuilt for other data.
    """
    if isinstance(spec, str):
        name, params = parse_spec(spec)
        if image_shape is None:
            raise KDBackdoorError(f"trigger spec '{spec}': the image shape (C, H, W) is needed")
        return trigger_class(name)(image_shape, seed, **params)
    if isinstance(spec, Mapping):
        return _from_config(spec, image_shape, seed)
    raise KDBackdoorError(
        f"a trigger spec is a string or a config dict, got {type(spec).__name__}"
    )


def _from_config(config: Mapping[str, Any], image_shape: ImageShape | None, seed: int) -> Trigger:
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown or "name" not in config:
        raise KDBackdoorError(
            f"trigger config {dict(config)!r}: needs 'name'; allowed keys: {', '.join(_CONFIG_KEYS)}"
        )
    name = config["name"]
    saved_shape = config.get("image_shape", image_shape)
    if saved_shape is None:
        raise KDBackdoorError(f"trigger config '{name}': no image_shape")
    params = config.get("params", {})
    if not isinstance(params, Mapping):
        raise KDBackdoorError(f"trigger config '{name}': params must be a mapping")
    trigger = trigger_class(name)(saved_shape, config.get("seed", seed), **params)
    if image_shape is not None and tuple(image_shape) != trigger.image_shape:
        raise KDBackdoorError(
            f"trigger config '{name}' was defined for images {trigger.image_shape}, "
            f"not {tuple(image_shape)}"
        )
    return trigger


def _parse_options(text: str, separator: str, spec: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in text.split(separator):
        if not item.strip():
            continue
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise KDBackdoorError(f"trigger spec '{spec}': option '{item}' is not key=value")
        if key in options:
            raise KDBackdoorError(f"trigger spec '{spec}': option '{key}' is given twice")
        options[key] = value.strip()
    return options
