"""Where a defense plugs into data-free distillation.

A defense subclasses ``DistillDefense`` and overrides any of the hooks; the base class does
nothing, so plain distillation is the base class. Hooks see only the teacher, the student and
the synthetic images, never test data or labels of real data.

- ``synthesis_loss``: a term added to the synthesiser's loss on each synthesis step;
- ``sample_weights``: per-sample weights (or 0 to drop) for the student's loss;
- ``student_step``: replaces the student's update step entirely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kdbackdoor.training import optimizer_step

LossFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class StudentStep:
    """One student update: ``loss(images, weights)`` is the distillation loss (batch mean of
    per-sample losses times ``weights`` when given); ``run`` applies one optimiser step, with
    the gradient norm clipped to ``max_grad_norm`` when > 0."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: LossFn
    max_grad_norm: float = 0.0
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale for the plain step (None: none)

    def run(self, images: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The plain step: loss, backward, optimiser step. Returns the loss (a detached device
        tensor: reading it is left to whoever logs it, so the step does not wait for the device)."""
        value = self.loss(images, weights)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None or not self.scaler.is_enabled():
            value.backward()
            self.apply_gradients()
            return value.detach()
        self.scaler.scale(value).backward()
        self.scaler.unscale_(self.optimizer)  # clipping sees true gradients
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value.detach()

    def apply_gradients(self) -> None:
        """The optimiser step on the gradients now in the student (clipped as configured)."""
        optimizer_step(self.optimizer, self.max_grad_norm)


class DistillDefense:
    """A defense's hooks into data-free distillation (the base class changes nothing)."""

    name = "none"

    def setup(self, teacher: torch.nn.Module, student: torch.nn.Module, device: torch.device) -> None:
        """Called once before the first iteration, with the frozen teacher and the new student."""

    def on_iteration(self, iteration: int, total: int) -> None:
        """Called at the start of each outer iteration (0-based) of ``total``."""

    def synthesis_loss(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        """An extra term for the synthesis loss on pixel ``images`` (None: no term)."""
        return None

    def sample_weights(self, images: torch.Tensor) -> torch.Tensor | None:
        """Weights (N,) ≥ 0 for the student's per-sample losses on pixel ``images`` (None: all 1)."""
        return None

    def student_step(self, step: StudentStep, images: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
        """Do the student's update on ``images`` and return its loss, or None for the plain step."""
        return None

    def record(self) -> dict:
        """What the defense did, for the run record."""
        return {"name": self.name}

    def state_dict(self) -> dict:
        """Resumable state (tensors and plain data only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` gave."""
