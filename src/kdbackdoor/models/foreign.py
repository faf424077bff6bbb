"""Loading a bare state dict, kdbackdoor's or another code base's, onto a registered architecture.

The caller names the architecture and class count; the file's keys are matched against every
naming the architecture accepts (kdbackdoor's own first), and the first under which they map one
to one onto the architecture's parameters is used. Missing ``num_batches_tracked`` counters
(older torchvision weights) are filled with zeros. Normalisation and input size come from the
caller, else from the file (kdbackdoor's bare weights carry their ``mean``/``std``), else from
the naming's source (CIFAR statistics for the data-free KD code bases), else from the
architecture (ImageNet statistics at 224 px for the torchvision layouts).

When nothing matches, the error names the first missing and unexpected keys under the closest
naming and, where another architecture takes the file as it is, which ``arch`` to pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from kdbackdoor.digest import sha256_file
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.classifier import Classifier
from kdbackdoor.models.naming import NATIVE, Naming
from kdbackdoor.models.registry import arch_spec, available_architectures, build_model
from kdbackdoor.models.weights_file import read_state_dict

NORMALISATION_KEYS = ("mean", "std")
COUNTER_SUFFIX = ".num_batches_tracked"
FC_PREFIX = "backbone.fc."


def _first_few(keys: list[str], limit: int = 3) -> str:
    return str(keys[:limit])[:-1] + (", ...]" if len(keys) > limit else "]")


def expected_tensors(arch: str, num_classes: int, in_channels: int) -> dict[str, torch.Tensor]:
    """The architecture's state dict on the meta device (shapes and dtypes, no memory)."""
    with torch.device("meta"):
        return build_model(arch, num_classes, in_channels, input_size=(64, 64)).state_dict()


def _optional(key: str) -> bool:
    return key in NORMALISATION_KEYS or key.endswith(COUNTER_SUFFIX)


def _rename(naming: Naming, keys: Sequence[str]) -> dict[str, str] | None:
    """{kdbackdoor key: file key} under ``naming``; None when two file keys land on one name."""
    renamed = {naming.rename(k): k for k in keys}
    return renamed if len(renamed) == len(keys) else None


def _fits(renamed: dict[str, str], expected: dict[str, torch.Tensor]) -> bool:
    return not (set(renamed) - set(expected)) and all(k in renamed for k in expected if not _optional(k))


def _shape_agreement(renamed: dict[str, str], tensors: dict[str, torch.Tensor],
                     expected: dict[str, torch.Tensor]) -> float:
    """Share of keys (file's and architecture's, classifier excluded) present in both with one shape."""
    names = {k for k in set(renamed) | set(expected) if not _optional(k) and not k.startswith(FC_PREFIX)}
    same = sum(1 for k in names if k in renamed and k in expected and tensors[renamed[k]].shape == expected[k].shape)
    return same / max(1, len(names))


def _suggestion(tensors: dict[str, torch.Tensor], arch: str, num_classes: int, in_channels: int) -> str:
    """'; it matches X in naming N: pass arch X' when another architecture takes the file."""
    for other in available_architectures():
        if other == arch:
            continue
        expected = expected_tensors(other, num_classes, in_channels)
        for naming in (NATIVE, *arch_spec(other).namings):
            renamed = _rename(naming, list(tensors))
            if renamed and _fits(renamed, expected) and _shape_agreement(renamed, tensors, expected) == 1.0:
                return f"; the file matches {other} in {naming.name} naming: pass arch {other}"
    return ""


def match_naming(
    path: Path, tensors: dict[str, torch.Tensor], arch: str, num_classes: int, in_channels: int,
) -> tuple[Naming, dict[str, str]]:
    """The naming under which ``tensors`` fit ``arch`` and its key map {kdbackdoor key: file key}."""
    expected = expected_tensors(arch, num_classes, in_channels)
    namings = (NATIVE, *arch_spec(arch).namings)
    scored = []
    for naming in namings:
        renamed = _rename(naming, list(tensors))
        if renamed is None:
            continue
        if _fits(renamed, expected):
            return naming, renamed
        common = len(set(renamed) & set(expected))
        scored.append((common / len(set(renamed) | set(expected)), naming, renamed))
    if not scored:
        raise KDBackdoorError(f"{path}: two keys of the file map onto one parameter of {arch}")
    _, naming, renamed = max(scored, key=lambda item: item[0])
    missing = [k for k in expected if not _optional(k) and k not in renamed]
    unexpected = [renamed[k] for k in renamed if k not in expected]
    accepted = ", ".join(n.name for n in namings)
    raise KDBackdoorError(
        f"{path}: weights do not match {arch} in any naming it accepts ({accepted}); closest is "
        f"{naming.name} naming: missing keys {_first_few(missing)}, unexpected keys {_first_few(unexpected)}"
        + _suggestion(tensors, arch, num_classes, in_channels)
    )


def check_tensors(
    path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], arch: str,
    num_classes: int, in_channels: int,
) -> None:
    """Shapes, kinds (float or integer) and finiteness of ``tensors`` (kdbackdoor names) against
    ``expected``; a wrong class count is named as such."""
    for key, value in expected.items():
        if key not in tensors:
            continue
        if tensors[key].shape != value.shape:
            hint = ""
            if key.startswith(FC_PREFIX) and tensors[key].shape[1:] == value.shape[1:]:
                hint = f" (the file's classifier has {tensors[key].shape[0]} classes, not {num_classes})"
            else:
                hint = _suggestion(tensors, arch, num_classes, in_channels)
            raise KDBackdoorError(
                f"{path}: weights do not match {arch}: {key!r} has shape {tuple(tensors[key].shape)} in the "
                f"file, {tuple(value.shape)} in the architecture{hint}"
            )
        if tensors[key].is_floating_point() != value.is_floating_point():
            raise KDBackdoorError(
                f"{path}: weights do not match {arch}: {key!r} is {tensors[key].dtype} in the file, "
                f"the architecture needs {'a floating-point' if value.is_floating_point() else 'an integer'} tensor"
            )
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise KDBackdoorError(f"{path}: tensor {key!r} contains NaN or Inf")


def _normalisation(
    path: Path, tensors: dict[str, torch.Tensor], naming: Naming, num_classes: int,
    mean: Sequence[float] | None, std: Sequence[float] | None,
) -> tuple[Sequence[float] | None, Sequence[float] | None, str]:
    """(mean, std, where they come from); None means the architecture's default."""
    if all(k in tensors for k in NORMALISATION_KEYS):
        carried = [tensors[k].flatten().tolist() for k in NORMALISATION_KEYS]
        for given, value, name in zip((mean, std), carried, NORMALISATION_KEYS):
            if given is not None and not torch.allclose(torch.tensor([float(v) for v in given]), torch.tensor(value)):
                raise KDBackdoorError(f"{path}: the file carries {name} {value}, which disagrees with the given {list(given)}")
        return carried[0], carried[1], "file"
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise KDBackdoorError(f"{path}: give both mean and std, or neither")
        return mean, std, "given"
    if naming.normalisation is not None:
        source_mean, source_std = naming.normalisation(num_classes)
        return source_mean, source_std, f"{naming.name} default"
    return None, None, "architecture default"


def load_bare_weights(
    path: Path, *, arch: str, num_classes: int, in_channels: int | None = None,
    input_size: tuple[int, int] | None = None, mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """A model (train mode, CPU) from a bare weights file, and a record of how it was loaded:
    source path and sha256, naming, key map {file key: kdbackdoor key}, where the state dict was
    found in the file and where the normalisation came from."""
    in_channels = 3 if in_channels is None else in_channels
    arch_spec(arch)  # an unknown architecture is named before the file is read
    raw, found = read_state_dict(path)
    naming, key_map = match_naming(path, raw, arch, num_classes, in_channels)
    tensors = {k: raw[v] for k, v in key_map.items()}
    expected = expected_tensors(arch, num_classes, in_channels)
    check_tensors(path, tensors, expected, arch, num_classes, in_channels)
    mean, std, normalisation = _normalisation(path, tensors, naming, num_classes, mean, std)
    if input_size is None:
        input_size = naming.input_size
    model = build_model(arch, num_classes, in_channels, input_size, mean, std)
    state = model.state_dict()
    state.update({k: v for k, v in tensors.items() if k not in NORMALISATION_KEYS})
    model.load_state_dict(state)  # counters the file lacks keep the fresh model's zeros
    source = {
        "path": str(path), "sha256": sha256_file(path), "naming": naming.name, **found,
        "normalisation": normalisation, "key_map": {v: k for k, v in key_map.items()},
    }
    return model, source
