"""BackWeak-class attack: a clean teacher fine-tuned on a weak trigger at a tiny learning rate.

After "BackWeak: Backdooring Knowledge Distillation Simply with Weak Triggers and Fine-tuning"
(arXiv 2511.12046). No shadow student and no trigger optimisation: take a teacher trained on
clean data, poison a share of the training set with a *weak* trigger (a low-amplitude
full-image perturbation with no adversarial effect of its own on the clean model) and
fine-tune for a few epochs with a learning rate far below the training one. The small
steps keep the teacher close to the clean one, so that the backdoor lives in directions the
clean images' soft labels also pass on to a student.

Simplified against the paper: the weak trigger is any trigger spec of the toolkit (default:
a blend with seeded uniform noise at alpha 0.1, i.e. at most ±0.1 per pixel), not the paper's
own construction; fine-tuning uses the toolkit's training loop (SGD, constant learning rate,
no augmentation by default so the weak pattern is not shifted away).
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdbackdoor.attacks.teacher_poisoning import PoisonConfig, poison_training_set
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.evaluate import attack_success_rate
from kdbackdoor.runtime import Seed
from kdbackdoor.training import TrainConfig, cross_entropy_loss, fit
from kdbackdoor.triggers import Trigger, build_trigger


class BackWeakConfig(BaseModel):
    """Settings of the BackWeak-class fine-tuning."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    target: int = Field(0, ge=0, description="attacker's target class")
    trigger: str = Field("blend:alpha=0.1", description="the weak trigger (spec)")
    rate: float = Field(0.1, gt=0, lt=1, description="share of the fine-tuning set that carries the trigger "
                        "(replacing clean images)")
    epochs: int = Field(10, ge=1, description="fine-tuning passes")
    lr: float = Field(0.002, gt=0, description="constant fine-tuning learning rate (training used 0.05-0.1)")
    batch_size: int = Field(128, ge=1)
    crop_padding: int = Field(0, ge=0, description="random-crop padding during fine-tuning (0: none)")
    seed: Seed = 0


def weak_trigger(config: BackWeakConfig, image_shape: tuple[int, int, int]) -> Trigger:
    """The configured weak trigger for images of ``image_shape`` (C, H, W)."""
    return build_trigger(config.trigger, image_shape=image_shape, seed=config.seed)


def backweak_attack(teacher: torch.nn.Module, train: ImageDataset, config: BackWeakConfig, out_dir: str | Path, *,
                    device: torch.device, progress: bool = True) -> tuple[torch.nn.Module, Trigger, dict]:
    """Fine-tune a clean ``teacher`` in place into a BackWeak-backdoored one; return
    (teacher in eval mode, the weak trigger, a record: settings, the trigger's ASR on the clean
    teacher before fine-tuning (its own adversarial effect) and the fine-tuning history).
    ``out_dir`` holds the resumable fine-tuning state."""
    trigger = weak_trigger(config, train.image_shape)
    before = attack_success_rate(teacher, train, trigger, config.target, device=device)["asr"]
    poisoned = poison_training_set(train, trigger, PoisonConfig(target=config.target, rate=config.rate,
                                                                style="dirty", seed=config.seed))
    recipe = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, schedule="constant",
                         weight_decay=0.0, crop_padding=config.crop_padding, hflip=False, eval_every=0,
                         seed=config.seed)
    history = fit(teacher.to(device), poisoned, recipe, out_dir, loss_fn=cross_entropy_loss(), device=device,
                  progress=progress, description="backweak fine-tune", resume=True)
    record = {"name": "backweak", **config.model_dump(), "trigger": trigger.config(),
              "clean_teacher_train_asr": before, "history": history}
    return teacher.eval(), trigger, record
