"""Neural Attention Distillation (NAD-class purification of a possibly backdoored student).

After Li et al., "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural
Networks" (ICLR 2021). Given a trained model and a small clean set:

1. **fine-tune a copy** (the NAD teacher) on the clean set with cross-entropy for
   ``teacher_epochs`` at learning rate ``lr``; a short clean fine-tune already weakens the
   backdoor's neurons;
2. **purify the model** on the same clean set with CE + β·Σ_stages ‖a_model − a_copy‖², where a
   is each stage's spatial attention (channel mean of squared activations, flattened and
   L2-normalised; ``kdbackdoor.distill.losses.attention_transfer_loss``), for ``epochs``.

The clean set is ``clean_size`` images drawn (seeded) from data the defender holds; NAD's own
setting is 5% of the training set. Both phases use the toolkit's training loop (SGD with its
schedule, random crop + flip as configured) and leave a resumable state in their folders.

Simplified against the paper: one β for all stages (NAD tunes one per layer), stages as the
architecture names them, the same clean set and augmentation in both phases.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.distill.hooks import KD_KINDS, register_defense
from kdbackdoor.distill.losses import attention_transfer_loss
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.features import forward_with_features
from kdbackdoor.runtime import Seed, cpu_generator
from kdbackdoor.training import LossFn, TrainConfig, cross_entropy_loss, fit


class NADConfig(BaseModel):
    """Settings of ``nad`` (defaults after NAD: 5% clean data, β ≈ 10³, lr 0.01)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    clean_size: int = Field(500, ge=10, description="clean images the defender holds (NAD: 5% of the training "
                            "set; capped at the data given)")
    teacher_epochs: int = Field(10, ge=1, description="clean fine-tuning epochs of the copy")
    epochs: int = Field(20, ge=1, description="attention-distillation epochs of the model")
    lr: float = Field(0.01, gt=0, description="peak SGD learning rate of both phases")
    beta: float = Field(1000.0, ge=0, description="weight of the attention term (summed over stages)")
    batch_size: int = Field(64, ge=2)
    crop_padding: int = Field(4, ge=0, description="random-crop padding of both phases (px)")
    hflip: bool = Field(True, description="random horizontal flips in both phases")
    seed: Seed = 0



@register_defense("nad", kinds=KD_KINDS, settings={"nad": NADConfig}, after_distillation=True,
                  description="NAD: the distilled student purified afterwards on clean data (experiments)")
def nad(nad: NADConfig) -> None:
    """NAD changes nothing during distillation: experiments purify the student afterwards."""
    return None

def clean_subset(data: ImageDataset, size: int, seed: int) -> ImageDataset:
    """A seeded subset of ``min(size, len(data))`` images of ``data`` (the defender's clean set)."""
    if len(data) < 2:
        raise KDBackdoorError(f"nad: need at least 2 clean images, got {len(data)}")
    rows = torch.randperm(len(data), generator=cpu_generator(seed + 104729))[:size].sort()[0]
    return data.subset(rows, name=f"{data.name}[clean {len(rows)}]")


def attention_distillation_loss(nad_teacher: torch.nn.Module, beta: float) -> LossFn:
    """A ``fit`` loss: CE to the labels + ``beta`` · attention transfer to ``nad_teacher`` (frozen)."""
    nad_teacher.eval()

    def loss_fn(model, x, y, idx):
        stages = model.stage_names
        logits, features = forward_with_features(model, x, stages)
        with torch.no_grad():
            _, teacher_features = forward_with_features(nad_teacher, x, nad_teacher.stage_names)
        loss = F.cross_entropy(logits, y)
        if beta > 0:
            loss = loss + beta * attention_transfer_loss([features[n] for n in stages],
                                                         [teacher_features[n] for n in nad_teacher.stage_names])
        return loss, logits
    return loss_fn


def nad_purify(model: torch.nn.Module, clean: ImageDataset, config: NADConfig, out_dir: str | Path, *,
               device: torch.device, progress: bool = True, resume: bool = False) -> tuple[torch.nn.Module, dict]:
    """Purify ``model`` in place with NAD on (a ``clean_size`` subset of) ``clean``; return
    (model in eval mode, record: settings, clean-set size, both phases' histories, seconds).
    ``out_dir`` gets the resumable states (``finetune/`` and ``purify/``)."""
    out_dir = Path(out_dir)
    held = clean_subset(clean, config.clean_size, config.seed)
    started = time.perf_counter()
    recipe = dict(batch_size=config.batch_size, lr=config.lr, crop_padding=config.crop_padding,
                  hflip=config.hflip, eval_every=0, seed=config.seed, weight_decay=5e-4, schedule="cosine")
    nad_teacher = copy.deepcopy(model).to(device)
    teacher_history = fit(nad_teacher, held, TrainConfig(epochs=config.teacher_epochs, **recipe),
                          out_dir / "finetune", loss_fn=cross_entropy_loss(), device=device, progress=progress,
                          description="nad fine-tune", resume=resume)
    history = fit(model.to(device), held, TrainConfig(epochs=config.epochs, **recipe), out_dir / "purify",
                  loss_fn=attention_distillation_loss(nad_teacher.requires_grad_(False), config.beta),
                  device=device, progress=progress, description="nad purify", resume=resume)
    record = {"name": "nad", **config.model_dump(), "clean_images": len(held),
              "finetune_history": teacher_history, "history": history,
              "seconds_this_run": time.perf_counter() - started}
    return model.eval(), record
