"""Reading a weights file as a state dict without ever unpickling code.

``.safetensors`` files have their header checked against the file size before any tensor is
allocated; ``.pt``/``.pth`` files go through ``torch.load(weights_only=True)``. A pickle holding
a training checkpoint (a dict with the state dict under ``state_dict``, ``model`` and the like,
next to epochs and accuracies) is unwrapped, and a ``module.`` prefix left by DataParallel is
removed.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.state_file import refusal_reason

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth")
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8}
"""safetensors dtypes accepted in weights, with their element size in bytes."""
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "state", "teacher", "student")
"""Where training scripts put the state dict inside a saved checkpoint dict, in order of preference."""
WRAPPER_PREFIX = "module."


def _check_header(path: Path) -> None:
    """Validate a safetensors header against the file size, before any tensor is allocated.

    Layout: 8-byte little-endian header length, a JSON header mapping tensor names to
    dtype, shape and [begin, end) byte offsets into the data that follows.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise KDBackdoorError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise KDBackdoorError(
                f"{path}: corrupt safetensors file: header of {header_len} bytes declared, "
                f"file has {size} bytes"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KDBackdoorError(f"{path}: corrupt safetensors file: header is not JSON") from None
    if not isinstance(header, dict):
        raise KDBackdoorError(f"{path}: corrupt safetensors file: header is not a JSON object")
    data_len = size - 8 - header_len
    for name, entry in header.items():
        if name != "__metadata__":
            _check_header_entry(path, name, entry, data_len)


def _check_header_entry(path: Path, name: str, entry: Any, data_len: int) -> None:
    def is_count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(entry, dict):
        raise KDBackdoorError(f"{path}: corrupt safetensors header entry for {name!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise KDBackdoorError(
            f"{path}: tensor {name!r} has unsupported dtype {dtype!r}; "
            f"supported: {', '.join(DTYPE_BYTES)}"
        )
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise KDBackdoorError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets)
        or offsets[0] > offsets[1] or offsets[1] > data_len
    ):
        raise KDBackdoorError(
            f"{path}: tensor {name!r} declares bytes {offsets!r} but the file holds {data_len} "
            f"bytes of tensor data (truncated or corrupt)"
        )
    if math.prod(shape) * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise KDBackdoorError(
            f"{path}: tensor {name!r} of shape {shape} ({dtype}) does not fit its "
            f"{offsets[1] - offsets[0]} bytes"
        )


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _unwrap(path: Path, state: Any) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict in a loaded pickle and the key it was nested under (None if top level)."""
    if _is_state_dict(state):
        return dict(state), None
    if isinstance(state, dict):
        nested = [k for k, v in state.items() if isinstance(k, str) and _is_state_dict(v)]
        preferred = [k for k in NESTED_KEYS if k in nested]
        if preferred or len(nested) == 1:
            key = (preferred or nested)[0]
            return dict(state[key]), key
        if nested:
            raise KDBackdoorError(
                f"{path}: holds several state dicts ({', '.join(map(repr, nested))}); "
                "save the one to load on its own"
            )
        keys = ", ".join(repr(k) for k in list(state)[:8])
        raise KDBackdoorError(f"{path}: not a state dict and none is nested in it (top-level keys: {keys})")
    raise KDBackdoorError(f"{path}: not a state dict (a mapping of names to tensors), found {type(state).__name__}")


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict in ``path`` on the CPU, and how it was found there.

    The second value records ``state_dict_key`` (the key a training checkpoint nested it under,
    or None) and ``stripped_prefix`` (``"module."`` when every key carried it, else None).
    """
    found: dict[str, Any] = {"state_dict_key": None, "stripped_prefix": None}
    if path.suffix == SAFETENSORS_SUFFIX:
        _check_header(path)
        try:
            tensors = safetensors.torch.load_file(path, device="cpu")
        except safetensors.SafetensorError as exc:
            raise KDBackdoorError(f"{path}: corrupt safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling fails in many ways; all of them mean "refused"
            raise KDBackdoorError(
                f"{path}: refused to load: the pickle holds more than tensors and plain containers "
                f"({refusal_reason(exc)}); export a state dict as .safetensors"
            ) from None
        tensors, found["state_dict_key"] = _unwrap(path, state)
    if tensors and all(k.startswith(WRAPPER_PREFIX) for k in tensors):
        tensors = {k[len(WRAPPER_PREFIX):]: v for k, v in tensors.items()}
        found["stripped_prefix"] = WRAPPER_PREFIX
    return tensors, found
