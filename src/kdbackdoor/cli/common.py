"""What the commands share beyond options: loading inputs named on the command line, turning
option values into typed configs (errors name the option), and starting a run's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kdbackdoor.errors import KDBackdoorError


def load_data(spec: str, split: str, data_dir: Optional[Path], resize: Optional[int], progress: bool = True):
    from kdbackdoor.data.sources import load_dataset
    return load_dataset(spec, split, data_dir=data_dir, resize=resize, progress=progress)


def make_trigger(spec: str, image_shape: tuple[int, int, int], seed: int):
    from kdbackdoor.triggers import build_trigger
    return build_trigger(spec, image_shape=image_shape, seed=seed)


def load_teacher(path: Path, device):
    from kdbackdoor.models import load_checkpoint
    return load_checkpoint(path, device=device)


def load_model(path: Path, device, data):
    from kdbackdoor.models import check_compatible, load_checkpoint
    model, _ = load_checkpoint(path, device=device)
    check_compatible(model, data)
    return model


def model_dir(path: Path) -> Path:
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
                  eval_every, seed, cutmix=0.0, compile_model=False):
    from kdbackdoor.training import TrainConfig
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
