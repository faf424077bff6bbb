"""Checkpoints: safetensors weights plus a JSON sidecar, loaded without ever unpickling code.

A checkpoint ``name.safetensors`` holds the state dict (including the normalisation buffers);
``name.json`` beside it describes the architecture, classes, provenance and the weights' sha256.
Every file is treated as untrusted: the safetensors header is checked against the file size
before anything is allocated, a sidecar-declared architecture is built on the ``meta`` device
before real memory is spent on it, and ``.pt``/``.pth`` files go through ``weights_only`` loading.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import struct
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

import kdbackdoor
from kdbackdoor.atomic import write_bytes, write_json
from kdbackdoor.digest import sha256_file
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.classifier import Classifier
from kdbackdoor.models.registry import build_model

FORMAT = "kdbackdoor-checkpoint/1"
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth")
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8}
"""safetensors dtypes accepted in weights, with their element size in bytes."""
REQUIRED_SIDECAR_KEYS = (
    "format", "arch", "num_classes", "in_channels", "input_size", "mean", "std", "weights_sha256",
)


def _describe(model: Classifier) -> dict[str, Any]:
    """What it takes to rebuild ``model``: architecture, shapes and normalisation."""
    return {
        "format": FORMAT,
        "arch": model.arch,
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "input_size": list(model.input_size),
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
    }




def save_checkpoint(
    model: Classifier, path: str | os.PathLike, *, classes: list[str] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``model``'s weights to ``path`` (suffix forced to .safetensors) and its sidecar.

    The sidecar (same stem, .json) is written last, so a complete sidecar means complete weights.
    ``metadata`` is free-form JSON (data set, training config, metrics, trigger...).
    Returns the path of the weights file.
    """
    path = Path(path).with_suffix(SAFETENSORS_SUFFIX)
    if classes is not None and len(classes) != model.num_classes:
        raise KDBackdoorError(
            f"{path}: {len(classes)} class names given for a model with {model.num_classes} classes"
        )
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise KDBackdoorError(f"{path}: metadata is not JSON-serialisable ({exc})") from None
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(path, safetensors.torch.save(tensors))
    sidecar = {
        **_describe(model),
        "classes": list(classes) if classes is not None else None,
        "weights_sha256": sha256_file(path),
        "versions": {
            "kdbackdoor": kdbackdoor.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "metadata": metadata,
    }
    write_json(path.with_suffix(".json"), sidecar)
    return path


def _resolve(path: Path) -> tuple[Path, Path | None]:
    """(weights file, sidecar or None) for a weights file, a sidecar or a checkpoint folder."""
    if not path.exists():
        raise KDBackdoorError(f"{path}: no such file or directory")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        # a run folder also holds train_state.pt (resumable state): safetensors weights win
        found = [p for p in found if p.suffix == ".safetensors"] or found
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise KDBackdoorError(
                f"{path}: a checkpoint folder must hold exactly one weights file "
                f"({', '.join(WEIGHT_SUFFIXES)}), found {names}"
            )
        path = found[0]
    if path.suffix == ".json":
        weights = [path.with_suffix(s) for s in WEIGHT_SUFFIXES if path.with_suffix(s).exists()]
        if len(weights) != 1:
            raise KDBackdoorError(
                f"{path}: expected one weights file beside the sidecar "
                f"({path.stem}{SAFETENSORS_SUFFIX}, .pt or .pth), found {len(weights)}"
            )
        return weights[0], path
    if path.suffix not in WEIGHT_SUFFIXES:
        raise KDBackdoorError(
            f"{path}: unknown checkpoint extension {path.suffix!r}; expected "
            f"{', '.join(WEIGHT_SUFFIXES)} or the .json sidecar"
        )
    sidecar = path.with_suffix(".json")
    return path, sidecar if sidecar.exists() else None


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KDBackdoorError(f"{path}: unreadable sidecar ({exc})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise KDBackdoorError(f"{path}: not a {FORMAT} sidecar")
    missing = [k for k in REQUIRED_SIDECAR_KEYS if k not in sidecar]
    if missing:
        raise KDBackdoorError(f"{path}: sidecar lacks {', '.join(missing)}")
    return sidecar


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


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` on the CPU; safetensors or a weights-only pickle."""
    if path.suffix == SAFETENSORS_SUFFIX:
        _check_header(path)
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except safetensors.SafetensorError as exc:
            raise KDBackdoorError(f"{path}: corrupt safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling fails in many ways; all of them mean "refused"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KDBackdoorError(
            f"{path}: refused to load: not a plain tensor state dict ({reason})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise KDBackdoorError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def _first_few(keys: list[str], limit: int = 5) -> str:
    return str(keys[:limit])[:-1] + (", ...]" if len(keys) > limit else "]")


def _check_tensors(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Keys, shapes and kinds (float or integer) of ``tensors`` against the architecture in
    ``config``; finite values.

    The architecture is built on the meta device, so an absurd description costs no memory.
    """
    try:
        with torch.device("meta"):
            expected = _build(config).state_dict()
    except (KDBackdoorError, TypeError, ValueError) as exc:
        raise KDBackdoorError(f"{path}: invalid architecture description ({exc})") from None
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise KDBackdoorError(
            f"{path}: weights do not match {config['arch']}: missing keys {_first_few(missing)}, "
            f"unexpected keys {_first_few(unexpected)}"
        )
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise KDBackdoorError(
                f"{path}: weights do not match {config['arch']}: {key!r} has shape "
                f"{tuple(tensors[key].shape)} in the file, {tuple(value.shape)} in the architecture"
            )
        if tensors[key].is_floating_point() != value.is_floating_point():
            raise KDBackdoorError(
                f"{path}: weights do not match {config['arch']}: {key!r} is {tensors[key].dtype} in the file, "
                f"the architecture needs {'a floating-point' if value.is_floating_point() else 'an integer'} tensor"
            )
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise KDBackdoorError(f"{path}: tensor {key!r} contains NaN or Inf")


def _build(config: dict[str, Any]) -> Classifier:
    return build_model(
        config["arch"], config["num_classes"], config["in_channels"],
        tuple(config["input_size"]), config.get("mean"), config.get("std"),
    )


def load_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", arch: str | None = None,
    num_classes: int | None = None, in_channels: int | None = None,
    input_size: tuple[int, int] | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Load a checkpoint; returns the model (eval mode, on ``device``) and its sidecar dict.

    ``path``: a .safetensors file, its .json sidecar, a folder holding one checkpoint, or a
    .pt/.pth state dict (loaded weights-only). With a sidecar, ``arch``/``num_classes``/
    ``in_channels``/``input_size`` are expectations checked against it; without one they
    describe the architecture (``arch`` and ``num_classes`` required; defaults 3 channels,
    32x32) and the returned dict is built from them. Every problem raises ``KDBackdoorError``.
    """
    weights_path, sidecar_path = _resolve(Path(path))
    given = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels,
             "input_size": list(input_size) if input_size is not None else None}
    if sidecar_path is not None:
        config = _read_sidecar(sidecar_path)
        for key, value in given.items():
            if value is not None and config[key] != value:
                raise KDBackdoorError(
                    f"{sidecar_path}: checkpoint has {key}={config[key]!r}, expected {value!r}"
                )
    elif arch is None or num_classes is None:
        raise KDBackdoorError(
            f"{weights_path}: no sidecar {weights_path.with_suffix('.json').name} beside it; "
            "pass arch and num_classes to load bare weights"
        )
    else:
        config = {
            **given,
            "in_channels": 3 if in_channels is None else in_channels,
            "input_size": [32, 32] if input_size is None else given["input_size"],
        }

    tensors = _read_tensors(weights_path)
    if sidecar_path is not None and sha256_file(weights_path) != config["weights_sha256"]:
        raise KDBackdoorError(
            f"{weights_path}: sha256 does not match the one recorded in {sidecar_path.name}"
        )
    _check_tensors(weights_path, config, tensors)
    model = _build(config)
    model.load_state_dict(tensors)
    if sidecar_path is None:
        config = {**_describe(model), "classes": None, "metadata": {}}
    return model.to(device).eval(), config
