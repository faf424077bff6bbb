"""Device selection, seeding and mixed precision: the few places that know about hardware."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from kdbackdoor.errors import KDBackdoorError


def select_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; any other name is passed to torch."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise KDBackdoorError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KDBackdoorError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_cpu_threads(threads: int | None = None) -> None:
    """Use one intra-op thread per physical core unless the user set OMP_NUM_THREADS."""
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (BatchNorm stays fp32 under autocast); a no-op on CPU."""
    if device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator: random draws made on it are identical whatever device runs the model."""
    return torch.Generator().manual_seed(seed)
