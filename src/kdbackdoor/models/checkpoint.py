"""Checkpoints: safetensors weights plus a JSON sidecar, loaded without ever unpickling code.

A checkpoint ``name.safetensors`` holds the state dict (including the normalisation buffers);
``name.json`` beside it describes the architecture, classes, provenance and the weights' sha256.
Every file is treated as untrusted (``kdbackdoor.models.weights_file``): the safetensors header
is checked against the file size before anything is allocated, a sidecar-declared architecture
is built on the ``meta`` device before real memory is spent on it, and ``.pt``/``.pth`` files go
through ``weights_only`` loading. Bare weights in foreign namings and timm hub folders load too.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import torch

import kdbackdoor
from kdbackdoor.atomic import write_bytes, write_json
from kdbackdoor.digest import sha256_file
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.numerics import to_layout
from kdbackdoor.models.classifier import Classifier
from kdbackdoor.models.foreign import check_tensors, expected_tensors, load_bare_weights
from kdbackdoor.models.hub import HUB_PREFIX, is_timm_folder, load_timm
from kdbackdoor.models.registry import build_model
from kdbackdoor.models.weights_file import SAFETENSORS_SUFFIX, WEIGHT_SUFFIXES, read_state_dict

FORMAT = "kdbackdoor-checkpoint/1"
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


def _native_tensors(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint with a sidecar: kdbackdoor's names exactly, shapes as described.

    The architecture is built on the meta device, so an absurd description costs no memory.
    """
    try:
        expected = expected_tensors(config["arch"], config["num_classes"], config["in_channels"])
        with torch.device("meta"):
            _build(config)  # input size and normalisation are valid for the architecture
    except (KDBackdoorError, TypeError, ValueError) as exc:
        raise KDBackdoorError(f"{path}: invalid architecture description ({exc})") from None
    tensors, _ = read_state_dict(path)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise KDBackdoorError(
            f"{path}: weights do not match {config['arch']}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )
    check_tensors(path, tensors, expected, config["arch"], config["num_classes"], config["in_channels"])
    return tensors


def _build(config: dict[str, Any]) -> Classifier:
    return build_model(
        config["arch"], config["num_classes"], config["in_channels"],
        tuple(config["input_size"]), config.get("mean"), config.get("std"),
    )


def load_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", arch: str | None = None,
    num_classes: int | None = None, in_channels: int | None = None,
    input_size: tuple[int, int] | None = None, mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Load a model from any source kdbackdoor reads; returns it (eval mode, on ``device``) and
    its sidecar dict.

    ``path``: a kdbackdoor checkpoint (.safetensors, its .json sidecar or a folder holding one);
    a bare .safetensors/.pt/.pth state dict in kdbackdoor's or a foreign naming
    (``kdbackdoor.models.foreign``; .pt/.pth loaded weights-only); a folder in timm's hub layout
    (config.json + model.safetensors) or ``hf:OWNER/REPO[@REVISION]`` (``kdbackdoor.models.hub``).
    With a sidecar or a config.json, ``arch``/``num_classes``/``in_channels``/``input_size``/
    ``mean``/``std`` are expectations checked against it; for bare weights they describe the
    model (``arch`` and ``num_classes`` required) and the returned dict records under
    ``source`` how the file was read. Every problem raises ``KDBackdoorError``.
    """
    given = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels,
             "input_size": list(input_size) if input_size is not None else None,
             "mean": [float(v) for v in mean] if mean is not None else None,
             "std": [float(v) for v in std] if std is not None else None}
    if str(path).startswith(HUB_PREFIX) or is_timm_folder(Path(path)):
        model, classes, source = load_timm(str(path), **given)
        return to_layout(model.to(device)).eval(), {**_describe(model), "classes": classes, "metadata": {}, "source": source}
    weights_path, sidecar_path = _resolve(Path(path))
    if sidecar_path is None:
        if arch is None or num_classes is None:
            raise KDBackdoorError(
                f"{weights_path}: no sidecar {weights_path.with_suffix('.json').name} beside it; "
                "give the architecture and class count (--arch, --num-classes) to load bare weights"
            )
        model, source = load_bare_weights(
            weights_path, arch=arch, num_classes=num_classes, in_channels=in_channels,
            input_size=input_size, mean=mean, std=std,
        )
        return to_layout(model.to(device)).eval(), {**_describe(model), "classes": None, "metadata": {}, "source": source}
    config = _read_sidecar(sidecar_path)
    for key, value in given.items():
        if value is not None and config[key] != value:
            raise KDBackdoorError(
                f"{sidecar_path}: checkpoint has {key}={config[key]!r}, expected {value!r}"
            )
    tensors = _native_tensors(weights_path, config)
    if sha256_file(weights_path) != config["weights_sha256"]:
        raise KDBackdoorError(
            f"{weights_path}: sha256 does not match the one recorded in {sidecar_path.name}"
        )
    model = _build(config)
    model.load_state_dict(tensors)
    return to_layout(model.to(device)).eval(), config
