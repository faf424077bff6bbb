"""ABD (Hong et al., ICML 2023): Shuffling Vaccine + Self-Retrospection, registered as the
defenses ``abd`` (both halves), ``sv`` and ``sr`` for data-free and OOD distillation."""

from __future__ import annotations

import torch

from kdbackdoor.defenses.self_retrospection import SelfRetrospection, SelfRetrospectionConfig
from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccine, ShufflingVaccineConfig
from kdbackdoor.distill.hooks import DistillDefense, StudentStep, TransferSet, register_defense


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

    def prepare_transfer_set(self, teacher: torch.nn.Module, transfer: TransferSet,
                             device: torch.device) -> TransferSet:
        for part in self.parts:
            transfer = part.prepare_transfer_set(teacher, transfer, device)
        return transfer

    def teacher_targets(self, teacher: torch.nn.Module, once_per_row: bool) -> torch.nn.Module:
        for part in self.parts:
            teacher = part.teacher_targets(teacher, once_per_row)
        return teacher

    def student_gradients(self, student, optimizer, images) -> list[torch.Tensor] | None:
        for part in self.parts:
            grads = part.student_gradients(student, optimizer, images)
            if grads is not None:
                return grads
        return None

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


ABD_KINDS = ("data-free", "ood")
ABD_SETTINGS = {"vaccine": ShufflingVaccineConfig, "retrospection": SelfRetrospectionConfig}


@register_defense("abd", kinds=ABD_KINDS, settings=ABD_SETTINGS,
                  description="ABD: Shuffling Vaccine and Self-Retrospection together (docs/abd.md)")
def abd(vaccine: ShufflingVaccineConfig, retrospection: SelfRetrospectionConfig) -> CombinedDefense:
    """Both halves of ABD; on OOD images the vaccine marks the transfer set before training."""
    return CombinedDefense("abd", [ShufflingVaccine(vaccine), SelfRetrospection(retrospection)])


@register_defense("sv", kinds=ABD_KINDS, settings={"vaccine": ShufflingVaccineConfig},
                  description="ABD's Shuffling Vaccine alone: synthesis (or the OOD transfer set) kept away "
                              "from backdoor-like images")
def sv(vaccine: ShufflingVaccineConfig) -> ShufflingVaccine:
    return ShufflingVaccine(vaccine)


@register_defense("sr", kinds=ABD_KINDS, settings={"retrospection": SelfRetrospectionConfig},
                  description="ABD's Self-Retrospection alone: the student unlearns a universal perturbation")
def sr(retrospection: SelfRetrospectionConfig) -> SelfRetrospection:
    return SelfRetrospection(retrospection)
