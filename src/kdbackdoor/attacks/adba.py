"""Anti-distillation backdoor (ADBA-class): teacher, trigger and a shadow student trained together.

After Ge et al., "Anti-Distillation Backdoor Attacks: Backdoors Can Really Survive in Knowledge
Distillation" (ACM MM 2021). A plain backdoored teacher answers the trigger, but a student
distilled from it on clean images rarely learns to: nothing in the clean images shows the
student the trigger. ADBA makes the trigger a feature that clean-image distillation *does*
carry, by simulating the victim's distillation during the teacher's training:

every step, on a batch of clean images x (labels y) and its triggered copy x' = x·(1−M) + M·p
(mask M fixed, pattern p learnt, pixel space [0, 1]):

1. **shadow** (a stand-in for the victim's student): one step of T²·KL(teacher_T(x) ‖ shadow_T(x))
   on the clean batch only, as a victim would distil;
2. **trigger**: one Adam step on p minimising CE(teacher(x'), t) + shadow_weight·CE(shadow(x'), t),
   so the pattern becomes something the shadow, which never saw a trigger, already maps to t;
3. **teacher**: one SGD step on CE(teacher(x), y) + backdoor_weight·CE(teacher(x'_b), t) over the
   share ``poison_share`` of the batch that carries the trigger (non-target images).

Simplified against the paper: one shadow of a fixed architecture, no second-order term
through the shadow's update, a fixed mask (the initial trigger's footprint) with only the
pattern learnt. The learnt trigger is saved as an image file plus mask, so every other part of
the toolkit (evaluation, distillation, defenses) rebuilds it with ``build_trigger``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.distill.losses import kd_divergence
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models import build_model
from kdbackdoor.runtime import Seed, cpu_generator, seed_everything
from kdbackdoor.triggers import Trigger, build_trigger

PATTERN_FILE = "adba_pattern.png"
MASK_FILE = "adba_mask.npy"


class ADBAConfig(BaseModel):
    """Settings of the ADBA-class attack (defaults sized for small images and models)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    target: int = Field(0, ge=0, description="attacker's target class")
    initial_trigger: str = Field("badnets-square", description="trigger spec whose footprint is the mask M and "
                                 "whose colours start the pattern p (a local trigger)")
    shadow_arch: str = Field("small-cnn", description="architecture of the shadow student")
    epochs: int = Field(30, ge=1, description="passes over the training set")
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.05, gt=0, description="teacher SGD peak learning rate (cosine decay)")
    shadow_lr: float = Field(0.05, gt=0, description="shadow SGD learning rate")
    trigger_lr: float = Field(0.1, gt=0, description="Adam step on the pattern's logits")
    temperature: float = Field(4.0, gt=0, description="temperature of the shadow's distillation")
    poison_share: float = Field(0.1, gt=0, lt=1, description="share of each batch trained with the trigger "
                                "and the target label")
    backdoor_weight: float = Field(1.0, ge=0, description="weight of the teacher's triggered CE")
    shadow_weight: float = Field(1.0, ge=0, description="weight of the shadow's CE in the trigger's loss")
    seed: Seed = 0


def adba_attack(train: ImageDataset, arch: str, config: ADBAConfig, out_dir: str | Path, *,
                device: torch.device, progress: bool = True) -> tuple[torch.nn.Module, Trigger, dict]:
    """Train a backdoored ``arch`` teacher on ``train`` with a learnt trigger; return
    (teacher in eval mode, the learnt trigger, a record of the attack).

    Writes the trigger to ``out_dir`` (``adba_pattern.png`` and ``adba_mask.npy``); the
    record's ``trigger`` is its config, which ``build_trigger`` rebuilds from those files.
    """
    if config.target >= train.num_classes:
        raise KDBackdoorError(f"adba: target {config.target} out of range for {train.num_classes} classes")
    c, h, w = train.image_shape
    initial = build_trigger(config.initial_trigger, image_shape=train.image_shape, seed=config.seed)
    footprint = initial.changed_mask()
    if footprint is None:
        raise KDBackdoorError(f"adba: the initial trigger {config.initial_trigger!r} changes the whole image; "
                              "give a local one (e.g. badnets-square) whose footprint becomes the mask")
    seed_everything(config.seed)
    rng = cpu_generator(config.seed)
    mask = footprint.to(device=device, dtype=torch.float32)[None, None]
    start = initial(torch.zeros(1, c, h, w, dtype=torch.float32)).to(device).clamp(0.02, 0.98)
    pattern_logits = torch.logit(start).requires_grad_(True)
    teacher = build_model(arch, num_classes=train.num_classes, in_channels=c, input_size=(h, w)).to(device)
    shadow = build_model(config.shadow_arch, num_classes=train.num_classes, in_channels=c,
                         input_size=(h, w)).to(device)
    teacher_opt = torch.optim.SGD(teacher.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4)
    shadow_opt = torch.optim.SGD(shadow.parameters(), lr=config.shadow_lr, momentum=0.9, weight_decay=5e-4)
    trigger_opt = torch.optim.Adam([pattern_logits], lr=config.trigger_lr)
    steps = config.epochs * -(-len(train) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(teacher_opt, steps)
    target = torch.tensor(config.target, device=device)
    data = train.to(device)

    def stamp(x: torch.Tensor) -> torch.Tensor:
        return x * (1 - mask) + mask * torch.sigmoid(pattern_logits)

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("adba teacher", total=steps)
        for _ in range(config.epochs):
            for x, y, _rows in data.batches(config.batch_size, shuffle=True, generator=rng):
                teacher.train(), shadow.train()
                with torch.no_grad():
                    teacher_logits = teacher(x)
                shadow_loss = kd_divergence(shadow(x), teacher_logits, config.temperature)
                _step(shadow_opt, shadow_loss)

                teacher.eval(), shadow.eval()  # the trigger step must not move BatchNorm statistics
                xt = stamp(x)
                trigger_loss = (F.cross_entropy(teacher(xt), target.expand(len(x)))
                                + config.shadow_weight * F.cross_entropy(shadow(xt), target.expand(len(x))))
                _step(trigger_opt, trigger_loss)

                teacher.train()
                carriers = (y != config.target) & (torch.rand(len(y), generator=rng).to(device) < config.poison_share)
                loss = F.cross_entropy(teacher(x), y)
                if carriers.any():
                    with torch.no_grad():
                        triggered = stamp(x[carriers])
                    loss = loss + config.backdoor_weight * F.cross_entropy(
                        teacher(triggered), target.expand(int(carriers.sum())))
                _step(teacher_opt, loss)
                schedule.step()
                bar.advance(task)
    trigger = _save_trigger(torch.sigmoid(pattern_logits.detach()).cpu(), footprint, Path(out_dir))
    record = {"name": "adba", **config.model_dump(), "trigger": trigger.config(),
              "final_losses": {"shadow": float(shadow_loss.detach()), "trigger": float(trigger_loss.detach()),
                                 "teacher": float(loss.detach())}}
    return teacher.eval(), trigger, record


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _save_trigger(pattern: torch.Tensor, footprint: torch.Tensor, out_dir: Path) -> Trigger:
    """Write the pattern (8-bit PNG) and mask (.npy); return the image trigger built from them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = (pattern[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    image.save(out_dir / PATTERN_FILE)
    np.save(out_dir / MASK_FILE, footprint.numpy().astype(np.float64))
    spec = f"image:{(out_dir / PATTERN_FILE).resolve()}?mode=mask&mask={(out_dir / MASK_FILE).resolve()}"
    return build_trigger(spec, image_shape=tuple(pattern.shape[1:]))
