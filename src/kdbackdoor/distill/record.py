"""What a distillation run records, shared by every kind of KD: its files, the backdoor the
student is checked for, the student's metrics and the defense's entry in the run record."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.evaluate import model_metrics
from kdbackdoor.triggers import Trigger

MODEL_FILE = "model.safetensors"
RECORD_FILE = "metrics.json"


@dataclass
class Backdoor:
    """The backdoor a student is checked for: trigger, target and (optionally) the source classes."""

    trigger: Trigger
    target: int
    source_classes: list[int] | None = None


def defense_parts(defense: dict | None) -> list[dict]:
    """The records of a run record's ``defense`` one by one: its ``parts``, itself when it is one
    defense, none when there is none (no entry, or data-free KD's ``{"name": "none"}``)."""
    if not defense or defense.get("name") == "none":
        return []
    return defense.get("parts", [defense])


def student_metrics(model: torch.nn.Module, test: ImageDataset, backdoor: Backdoor | None,
                    device: torch.device) -> dict:
    """``model_metrics`` on ``test`` for the backdoor a distilled student is checked for (if any)."""
    if backdoor is None:
        return model_metrics(model, test, device=device)
    return model_metrics(model, test, trigger=backdoor.trigger, target=backdoor.target,
                         source_classes=backdoor.source_classes, device=device)


def backdoor_record(backdoor: Backdoor | None) -> dict | None:
    """The backdoor as JSON data for run records (None when there is none)."""
    if backdoor is None:
        return None
    return {"trigger": backdoor.trigger.config(), "target": backdoor.target,
            "source_classes": backdoor.source_classes}
