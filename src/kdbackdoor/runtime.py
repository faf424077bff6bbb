"""Device selection, seeding and threads: the few places that know about hardware (precision and
layout: ``kdbackdoor.numerics``)."""

from __future__ import annotations

import contextlib
import os
import random
import time
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from kdbackdoor.errors import KDBackdoorError

Seed = Annotated[int, Field(ge=0, lt=2**63, description="random seed, 0 <= seed < 2^63 (what torch generators take)")]
"""The type of every ``seed`` field in a config."""

def _accelerator() -> torch.device | None:
    """This machine's accelerator (CUDA, XPU, MPS, ...) as torch reports it, or None."""
    return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None


def select_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks the machine's accelerator when present, else CPU; any other name is passed
    to torch and must be the CPU or that accelerator (e.g. ``cuda:1``)."""
    accelerator = _accelerator()
    if name in (None, "auto"):
        return accelerator or torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise KDBackdoorError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type != "cpu" and (accelerator is None or device.type != accelerator.type):
        present = f"its accelerator is {accelerator.type}" if accelerator else "it has no accelerator"
        raise KDBackdoorError(f"device {name!r} is not available on this machine ({present}; use auto or cpu)")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool = True) -> None:
    """Make torch pick deterministic kernels (raising on ops that have none), or stop doing so.

    On CUDA, cuBLAS also needs a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``), set here unless
    the user set it; call this before the first CUDA matrix product. On CPU, runs are already
    reproducible with the same seed; this only rules out the few nondeterministic CPU kernels.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)


def set_cpu_threads(threads: int | None = None) -> None:
    """Use one intra-op thread per physical core unless the user set OMP_NUM_THREADS."""
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator: random draws made on it are identical whatever device runs the model."""
    return torch.Generator().manual_seed(seed)


class Stopwatch:
    """Wall seconds spent inside ``timing`` blocks, summed (e.g. a defense's own work, to report its
    overhead). On CUDA the device is synchronised at both ends of a block, so the kernels a block
    queued are counted in it rather than in whatever waits for them next."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def timing(self, device: torch.device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds += time.perf_counter() - started
