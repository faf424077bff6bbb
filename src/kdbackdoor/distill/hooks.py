"""Where a defense plugs into distillation, for every kind of KD, and the registry of defenses.

A defense subclasses ``DistillDefense`` and overrides any of the hooks; the base class does
nothing, so plain distillation is the base class. Hooks see the teacher, the student and the
images the student learns from, never test data, provenance or test ASR.

Every KD (dataset, OOD, data-free):

- ``setup``: once per student, before its first step (reset per-student state here);
- ``on_iteration``: at each data-free iteration, or each optimiser step of dataset/OOD KD;
- ``student_gradients``: gradients added to the student's own at each step (Self-Retrospection);
- ``record`` / ``state_dict`` / ``load_state_dict``: the run record and resumable state.

Dataset and OOD KD (``kdbackdoor.distill.dataset_kd``):

- ``prepare_transfer_set``: once, before training: drop rows, or mark rows on which the student
  is pushed away from the teacher (the Shuffling Vaccine on OOD images);
- ``teacher_targets``: the module whose outputs the student learns (robust KD's view-averaged teacher).

Data-free KD (``kdbackdoor.distill.data_free``):

- ``synthesis_loss``: a term added to the synthesiser's loss on each synthesis step (Shuffling Vaccine);
- ``sample_weights``: per-sample weights (or 0 to drop) for the student's loss;
- ``student_step``: replaces the student's update step entirely (the default adds ``student_gradients``).

A defense is made available by name with ``@register_defense(name, kinds=..., description=...)``
on a builder function; the registry (``DEFENSES``) says which KD methods each supports, and
the command line, configs and documentation take their names and choices from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
from pydantic import BaseModel

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.distill.data_free_config import METHOD_DEFAULTS
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.registry import Registry
from kdbackdoor.training import add_gradients, optimizer_step

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

    def run(self, images: torch.Tensor, weights: torch.Tensor | None = None,
            extra: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The plain step: loss, backward (plus ``extra`` gradients, one per trainable parameter),
        optimiser step. Returns the loss (a detached device tensor: reading it is left to whoever
        logs it, so the step does not wait for the device). A step with ``extra`` gradients runs
        without fp16's loss scale (the added gradients are unscaled)."""
        value = self.loss(images, weights)
        self.optimizer.zero_grad(set_to_none=True)
        if extra is not None or self.scaler is None or not self.scaler.is_enabled():
            value.backward()
            if extra is not None:
                add_gradients([p for p in self.student.parameters() if p.requires_grad], extra)
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


@dataclass
class TransferSet:
    """A distillation set as the defense leaves it: the images to train on and, optionally, the
    rows (bool (N,)) on which the student is pushed away from the teacher with ``push_weight``."""

    data: ImageDataset
    push_away: torch.Tensor | None = None
    push_weight: float = 0.0


class DistillDefense:
    """A defense's hooks into distillation (the base class changes nothing)."""

    name = "none"

    def setup(self, teacher: torch.nn.Module, student: torch.nn.Module, device: torch.device) -> None:
        """Called once per student before its first step, with the frozen teacher and the new student."""

    def on_iteration(self, iteration: int, total: int) -> None:
        """Called at the start of each data-free iteration, or before each optimiser step of dataset
        KD (0-based, of ``total``)."""

    def prepare_transfer_set(self, teacher: torch.nn.Module, transfer: TransferSet,
                             device: torch.device) -> TransferSet:
        """Dataset/OOD KD, once before training: the set to distil on (rows dropped or marked)."""
        return transfer

    def teacher_targets(self, teacher: torch.nn.Module, once_per_row: bool) -> torch.nn.Module:
        """Dataset/OOD KD: the module whose outputs on pixel images the student learns (the teacher
        itself by default). ``once_per_row``: its outputs are computed once per row, before training
        (no augmentation), rather than on every batch."""
        return teacher

    def student_gradients(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          images: torch.Tensor) -> list[torch.Tensor] | None:
        """Gradients (one per trainable parameter of ``student``) added to the distillation loss's
        at this step on pixel ``images`` (None: nothing added)."""
        return None

    def extra_gradients(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                        step: int, total: int) -> list[torch.Tensor] | None:
        """The defense as a ``kdbackdoor.training.fit`` step hook (dataset KD): each optimiser step
        is an iteration."""
        self.on_iteration(step, total)
        return self.student_gradients(model, optimizer, x)

    def synthesis_loss(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        """An extra term for the synthesis loss on pixel ``images`` (None: no term)."""
        return None

    def sample_weights(self, images: torch.Tensor) -> torch.Tensor | None:
        """Weights (N,) ≥ 0 for the student's per-sample losses on pixel ``images`` (None: all 1)."""
        return None

    def student_step(self, step: StudentStep, images: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
        """Do the student's update on ``images`` and return its loss, or None for the plain step
        (the default: the plain step with ``student_gradients`` added, when there are any)."""
        extra = self.student_gradients(step.student, step.optimizer, images)
        return None if extra is None else step.run(images, weights, extra)

    def record(self) -> dict:
        """What the defense did, for the run record."""
        return {"name": self.name}

    def state_dict(self) -> dict:
        """Resumable state (tensors and plain data only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` gave."""


KD_KINDS = ("dataset", "ood", "data-free")
"""What a defense can support: distillation on a data set with its labels, on out-of-distribution
images (KL only), or without data (every method of ``METHOD_DEFAULTS``)."""


@dataclass(frozen=True)
class DefenseEntry:
    """A registered defense: ``build(**settings)`` makes its distillation hooks (None: none) from
    the settings it reads (``settings``: keyword -> its pydantic config class); ``kinds`` are the
    KD kinds it supports (``KD_KINDS``), in the order methods are listed. ``after_distillation``:
    it acts on the finished student instead (a purification that experiments run afterwards)."""

    build: Callable[..., DistillDefense | None]
    kinds: tuple[str, ...]
    description: str
    settings: dict[str, type[BaseModel]] = field(default_factory=dict)
    after_distillation: bool = False

    @property
    def methods(self) -> tuple[str, ...]:
        """The distillation methods (``dataset``, ``ood``, ``zskt``, ...) it works with."""
        return tuple(m for kind in self.kinds for m in (METHOD_DEFAULTS if kind == "data-free" else (kind,)))


DEFENSES: Registry[DefenseEntry] = Registry("defense")
B = TypeVar("B", bound=Callable[..., "DistillDefense | None"])


def register_defense(name: str, *, kinds: tuple[str, ...], description: str,
                     settings: dict[str, type[BaseModel]] | None = None,
                     after_distillation: bool = False) -> Callable[[B], B]:
    """Decorator on a builder ``f(**settings) -> DistillDefense``: make the defense available as ``name``."""
    unknown = set(kinds) - set(KD_KINDS)
    if unknown:
        raise ValueError(f"defense {name!r}: unknown KD kinds {sorted(unknown)}; use {', '.join(KD_KINDS)}")

    def register(build: B) -> B:
        DEFENSES.add(name, DefenseEntry(build, tuple(kinds), description, dict(settings or {}), after_distillation))
        return build

    return register


register_defense("none", kinds=KD_KINDS, description="no defense")(lambda: None)


def build_defense(name: str, method: str | None = None, **settings: BaseModel | None) -> DistillDefense | None:
    """The defense registered as ``name`` (None for none), made from ``settings`` (keyword: config;
    a setting it does not read is ignored, one it reads but is not given takes its defaults).
    With ``method``, a defense that does not support it is refused."""
    entry = DEFENSES[name]
    if method is not None and method not in entry.methods:
        raise KDBackdoorError(f"defense {name!r} applies to methods {', '.join(entry.methods)}, not {method!r}")
    return entry.build(**{key: settings.get(key) or config() for key, config in entry.settings.items()})


def describe_defenses() -> str:
    """One line per defense: its name, what it does and the methods it works with (for --help, docs)."""
    return "\n".join(f"{name}: {entry.description} ({', '.join(entry.kinds)})" for name, entry in DEFENSES.items())
