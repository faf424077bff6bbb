"""ABD (Hong et al., ICML 2023) for data-free distillation: Shuffling Vaccine + Self-Retrospection,
and the names users pick defenses by (``--defense abd|sv|sr``)."""

from __future__ import annotations

import torch

from kdbackdoor.defenses.self_retrospection import SelfRetrospection, SelfRetrospectionConfig
from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccine, ShufflingVaccineConfig
from kdbackdoor.distill.hooks import DistillDefense, StudentStep
from kdbackdoor.errors import KDBackdoorError

DATA_FREE_DEFENSES = ("none", "abd", "sv", "sr")


class CombinedDefense(DistillDefense):
    """Several defenses at once: synthesis terms add up, sample weights multiply, and the first
    defense that replaces the student step does it."""

    def __init__(self, name: str, parts: list[DistillDefense]) -> None:
        self.name = name
        self.parts = parts

    def setup(self, teacher, student, device) -> None:
        for part in self.parts:
            part.setup(teacher, student, device)

    def on_iteration(self, iteration: int, total: int) -> None:
        for part in self.parts:
            part.on_iteration(iteration, total)

    def synthesis_loss(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        terms = [t for t in (part.synthesis_loss(images, teacher_logits) for part in self.parts) if t is not None]
        return sum(terms) if terms else None

    def sample_weights(self, images: torch.Tensor) -> torch.Tensor | None:
        weights = [w for w in (part.sample_weights(images) for part in self.parts) if w is not None]
        return torch.stack(weights).prod(0) if weights else None

    def student_step(self, step: StudentStep, images: torch.Tensor, weights: torch.Tensor | None) -> float | None:
        for part in self.parts:
            loss = part.student_step(step, images, weights)
            if loss is not None:
                return loss
        return None

    def record(self) -> dict:
        return {"name": self.name, "parts": [part.record() for part in self.parts]}

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        for part, part_state in zip(self.parts, state["parts"]):
            part.load_state_dict(part_state)


def abd_halves(name: str) -> tuple[bool, bool]:
    """Whether the defense called ``name`` uses (the Shuffling Vaccine, Self-Retrospection)."""
    return name in ("abd", "sv"), name in ("abd", "sr")


def build_data_free_defense(name: str, vaccine: ShufflingVaccineConfig | None = None,
                            retrospection: SelfRetrospectionConfig | None = None) -> DistillDefense | None:
    """The defense called ``name`` (none, abd, sv, sr) with the given settings; None for none."""
    if name == "none":
        return None
    if name not in DATA_FREE_DEFENSES:
        raise KDBackdoorError(f"unknown defense {name!r} for data-free distillation; use one of "
                              f"{', '.join(DATA_FREE_DEFENSES)}")
    uses_vaccine, uses_retrospection = abd_halves(name)
    parts = ([ShufflingVaccine(vaccine)] if uses_vaccine else []) + (
        [SelfRetrospection(retrospection)] if uses_retrospection else [])
    return CombinedDefense(name, parts) if len(parts) > 1 else parts[0]
