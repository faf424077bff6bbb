"""Robust distillation: teacher targets averaged over random views of each image.

A poison crafted against the teacher (threat 1) gets its target label from a perturbation
that sits just across the teacher's decision boundary; small random changes (noise, blur,
JPEG, crop+flip; ``kdbackdoor.defenses.views``) undo it, while clean images keep their class.
``RobustTeacher`` wraps the teacher so that its output for an image x is

    log( mean_k softmax(teacher(view_k(x))) )

(log-probabilities, usable as logits: the KD loss then applies its temperature as usual),
so the student learns the view-averaged distribution, in which a poison mostly points back
to its source class. Each view applies every configured kind in order (default: a random
crop+flip, then JPEG re-encoding), with fresh random draws per view. Registered as the
defense ``robust-kd`` (dataset and OOD KD), through the ``teacher_targets`` hook.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdbackdoor.defenses.views import ViewConfig, apply_view
from kdbackdoor.distill.hooks import DistillDefense, register_defense
from kdbackdoor.runtime import Seed, Stopwatch, cpu_generator


class RobustKDConfig(BaseModel):
    """Settings of ``--defense robust-kd``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    views: ViewConfig = Field(default_factory=lambda: ViewConfig(kinds=["crop-flip", "jpeg"], jpeg_quality=30))
    num_views: int = Field(8, ge=1, description="K: views averaged per teacher target")
    seed: Seed = 0  # seed of the view draws


class RobustTeacher(torch.nn.Module):
    """The teacher seen through ``num_views`` random views: ``forward(x)`` takes pixel images
    [0, 1] (N, C, H, W) and returns the log of the view-averaged softmax (N, K)."""

    def __init__(self, teacher: torch.nn.Module, config: RobustKDConfig) -> None:
        super().__init__()
        self.teacher = teacher
        self.config = config
        self.num_classes = getattr(teacher, "num_classes", None)
        self.in_channels = getattr(teacher, "in_channels", None)
        self.generator = cpu_generator(config.seed)
        self.stopwatch = Stopwatch()  # time spent making targets: the defense's cost

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.stopwatch.timing(x.device):
            total = None
            for _ in range(self.config.num_views):
                view = x
                for kind in self.config.views.kinds:
                    view = apply_view(view, kind, self.config.views, self.generator)
                p = self.teacher(view).float().softmax(1)
                total = p if total is None else total + p
            return (total / self.config.num_views).clamp_min(1e-12).log()


def robust_kd_record(config: RobustKDConfig, cached: bool, seconds: float) -> dict:
    """What a run record says about the defense: its settings, how targets were made and how long
    making them took in this process (``seconds``: all views' teacher passes, of which a plain
    teacher would have made one per image)."""
    how = (f"cached: each row's {config.num_views} views were drawn once (seed {config.seed}) before training"
           if cached else f"on the fly: {config.num_views} fresh views of every augmented batch (seed {config.seed})")
    return {"name": "robust-kd", **config.model_dump(), "targets": how,
            "view": " then ".join(config.views.kinds),
            "teacher_forwards_per_image": config.num_views, "seconds_this_run": seconds}


class RobustKD(DistillDefense):
    """Robust KD as a defense: the student learns ``RobustTeacher``'s view-averaged targets."""

    name = "robust-kd"

    def __init__(self, config: RobustKDConfig | None = None) -> None:
        self.config = config or RobustKDConfig()
        self.targets: RobustTeacher | None = None
        self.once_per_row = False

    def teacher_targets(self, teacher: torch.nn.Module, once_per_row: bool) -> torch.nn.Module:
        self.targets, self.once_per_row = RobustTeacher(teacher, self.config), once_per_row  # fresh per student
        return self.targets

    def record(self) -> dict:
        return robust_kd_record(self.config, self.once_per_row, self.targets.stopwatch.seconds if self.targets else 0.0)


@register_defense("robust-kd", kinds=("dataset", "ood"), settings={"robust": RobustKDConfig},
                  description="teacher targets averaged over random views of each image (docs/defenses-data.md)")
def robust_kd(robust: RobustKDConfig) -> RobustKD:
    return RobustKD(robust)
