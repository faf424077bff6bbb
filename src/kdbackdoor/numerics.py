"""Numerics of a run: precision (fp32, bf16, fp16), memory layout and compilation, in one policy.

A run sets its policy once (``use_numerics``); every hot path reads it through three calls,
so no loop needs to know which precision it runs in:

- ``autocast(device)`` around forward passes: bf16 or fp16 autocast, or nothing for fp32.
  Under autocast, matrix products and convolutions run in the low precision while
  BatchNorm, softmax, losses and reductions stay fp32 (torch's autocast lists).
- ``to_layout(model)`` / ``layout(x)``: channels-last (NHWC) weights and batches, or NCHW.
- ``compiled(model)``: ``torch.compile`` of the model's forward, or the model itself.

``auto`` means bf16 + channels-last where the device computes bf16 natively (CUDA GPUs with
bf16, CPUs with AVX-512 BF16 or AMX), fp32 + channels-last otherwise. fp16 trains with a
dynamic loss scale (``grad_scaler``). What a run used is ``numerics_record()``.

What stays fp32 on purpose: parameters, optimiser state and gradients (autocast only lowers
the precision of operations); the attack and inversion *variables* (PGD/CW perturbations,
Neural Cleanse masks, Self-Retrospection's universal perturbation, synthetic images held in a
pool) are fp32 tensors whose updates are computed in fp32: only the model's forward and
backward inside them are autocast. Their gradients reach the variable through fp32
arithmetic, so a step of 1/255 is not lost to bf16's 8-bit mantissa. Self-Retrospection's
hypergradient (the fixed-point solve) runs in fp32 entirely, because its series sums many
small terms whose rounding would bias it.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Numerics:
    """A run's numeric policy as asked for. ``channels_last`` None: on (it helps convolutions on
    oneDNN CPUs and cuDNN GPUs alike); ``compile``: torch.compile the models' forward."""

    precision: Precision = "auto"
    channels_last: bool | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products natively (not by emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16``: ``auto`` made concrete for ``device``."""
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if precision == "fp16" and device.type not in ("cuda", "cpu"):
        return "fp32"
    return precision


_CURRENT: contextvars.ContextVar[Numerics] = contextvars.ContextVar("kdbackdoor_numerics", default=Numerics())


def current_numerics() -> Numerics:
    """The policy in force (``Numerics()``, i.e. auto, unless a caller set another)."""
    return _CURRENT.get()


def set_numerics(numerics: Numerics) -> None:
    """Make ``numerics`` the policy of this process (or of this context)."""
    _CURRENT.set(numerics)


@contextlib.contextmanager
def use_numerics(numerics: Numerics) -> Iterator[Numerics]:
    """Run a block under ``numerics``; the previous policy comes back afterwards."""
    token = _CURRENT.set(numerics)
    try:
        yield numerics
    finally:
        _CURRENT.reset(token)


def precision_on(device: torch.device) -> str:
    """The concrete precision the current policy gives ``device``."""
    return resolve_precision(current_numerics().precision, device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the policy's low precision on ``device``; a no-op for fp32."""
    precision = precision_on(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def channels_last_on() -> bool:
    """Whether the current policy stores weights and batches channels-last."""
    choice = current_numerics().channels_last
    return True if choice is None else choice


def to_layout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its 4-D weights in the policy's layout (in place; returns it). Values are
    unchanged; channels-last convolutions keep their outputs channels-last."""
    return model.to(memory_format=torch.channels_last if channels_last_on() else torch.contiguous_format)


def layout(x: torch.Tensor) -> torch.Tensor:
    """A 4-D batch in the policy's layout (a copy only when it is not already in it)."""
    if x.dim() != 4:
        return x
    return x.contiguous(memory_format=torch.channels_last if channels_last_on() else torch.contiguous_format)


def compiled(model: torch.nn.Module, force: bool = False) -> torch.nn.Module:
    """``torch.compile(model)`` when the policy (or ``force``) asks for it, else ``model``. The
    compiled module shares the model's parameters, buffers and train/eval mode."""
    return torch.compile(model) if force or current_numerics().compile else model


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A dynamic loss scale for fp16 training (enabled only when the policy's precision on
    ``device`` is fp16; a disabled scaler passes losses and steps through unchanged)."""
    return torch.amp.GradScaler(device.type, enabled=precision_on(device) == "fp16")


def numerics_record(device: torch.device) -> dict:
    """What a run record says about its numerics: asked for and used on ``device``."""
    numerics = current_numerics()
    return {"precision_requested": numerics.precision, "precision": precision_on(device),
            "channels_last": channels_last_on(), "compile": numerics.compile}
