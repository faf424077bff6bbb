"""What the commands share beyond options: loading inputs named on the command line, turning
option values into typed configs (errors name the option), and starting a run's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kdbackdoor.errors import KDBackdoorError


def load_data(spec: str, split: str, data_dir: Optional[Path], resize: Optional[int], progress: bool = True):
    from kdbackdoor.data.sources import load_dataset
    return load_dataset(spec, split, data_dir=data_dir, resize=resize, progress=progress)


def seeded_subset(data, count: Optional[int], seed: int):
    """``count`` images of ``data`` drawn with ``seed`` (in their original order), or all of it when
    ``count`` is None, 0 or at least its size."""
    if not count or count >= len(data):
        return data
    import torch
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count].sort()[0]
    return data.subset(rows, name=f"{data.name}[subset {count}]")


def make_trigger(spec: str, image_shape: tuple[int, int, int], seed: int):
    from kdbackdoor.triggers import build_trigger
    return build_trigger(spec, image_shape=image_shape, seed=seed)


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise KDBackdoorError(f"{option}: expected comma-separated numbers, got {text!r}") from None


def _size(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise KDBackdoorError(f"--input-size: expected N or HxW in px, got {text!r}")
    return (sides[0], sides[-1])


def model_source(arch: Optional[str], num_classes: Optional[int], input_size: Optional[str], mean: Optional[str],
                 std: Optional[str]) -> dict:
    """``load_checkpoint`` keyword arguments from the model-source options (--arch, --num-classes,
    --input-size, --mean, --std)."""
    return {"arch": arch, "num_classes": num_classes, "input_size": _size(input_size),
            "mean": _floats(mean, "--mean"), "std": _floats(std, "--std")}


def load_teacher(path: Path, device, source: Optional[dict] = None):
    """(model, sidecar) for any model source; a foreign one is described on stderr."""
    from kdbackdoor.models import load_checkpoint
    model, sidecar = load_checkpoint(path, device=device, **(source or {}))
    imported = sidecar.get("source")
    if imported:
        from kdbackdoor.cli.app import err_console
        height, width = sidecar["input_size"]
        err_console.print(f"{path}: {sidecar['arch']}, {sidecar['num_classes']} classes, {height}x{width} px, "
                          f"{imported['naming']} names, normalisation: {imported['normalisation']}", highlight=False)
    return model, sidecar


def load_model(path: Path, device, data, source: Optional[dict] = None):
    from kdbackdoor.models import check_compatible
    model, _ = load_teacher(path, device, source)
    check_compatible(model, data)
    return model


def model_dir(path: Path) -> Path:
    """The folder that files about a model go beside: its own, or the current one for a hub model."""
    from kdbackdoor.models.hub import HUB_PREFIX
    if str(path).startswith(HUB_PREFIX):
        return Path(".")
    return path if path.is_dir() else path.parent


def optional_path(text: Optional[str]) -> Optional[Path]:
    return Path(text) if text else None


def start_run(out: Path, resume: bool, deterministic: bool) -> None:
    """Before a run's work starts: deterministic kernels if asked; on resume, drop the temporaries
    that the interrupted run's half-finished writes left in ``out``."""
    from kdbackdoor.atomic import remove_temporaries
    from kdbackdoor.runtime import set_deterministic
    if deterministic:
        set_deterministic(True)
    if resume:
        remove_temporaries(out)


def int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise KDBackdoorError(f"{option}: expected comma-separated integers, got {text!r}") from None


def pixel_value(text: str, option: str) -> float:
    """A float or a fraction such as 8/255."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise KDBackdoorError(f"{option}: expected a number or a fraction like 8/255, got {text!r}") from None


def train_config(epochs, batch_size, lr, weight_decay, schedule, label_smoothing, crop_padding, hflip,
                  eval_every, seed, cutmix=0.0, compile_model=False, *, dataset: str = "", resize=None):
    """A ``TrainConfig`` from the training options; crop padding and flips left unset (None) take the
    defaults of ``dataset`` (``data.sources.default_augmentation``)."""
    from kdbackdoor.data.sources import default_augmentation
    from kdbackdoor.training import TrainConfig
    default_crop, default_flip = default_augmentation(dataset, resize)
    crop_padding = default_crop if crop_padding is None else crop_padding
    hflip = default_flip if hflip is None else hflip
    return validated(TrainConfig, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                     schedule=schedule, label_smoothing=label_smoothing, crop_padding=crop_padding,
                     hflip=hflip, cutmix=cutmix, eval_every=eval_every, seed=seed, compile=compile_model)


def validated(model_cls, options: Optional[dict[str, str]] = None, **values):
    """``model_cls(**values)``; a validation error names the CLI option: ``options`` maps a field to
    its option where they differ (rate -> --poison-rate), else --field-name."""
    from pydantic import ValidationError
    try:
        return model_cls(**values)
    except ValidationError as exc:
        def option(loc: tuple) -> str:
            return (options or {}).get(loc[0]) or f"--{'-'.join(map(str, loc)).replace('_', '-')}"
        problems = "; ".join(f"{option(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise KDBackdoorError(f"invalid option: {problems}") from None
