"""Poisoned training sets for backdoored teachers (all-to-one, dirty- or clean-label).

Rate semantics: ``rate`` is the share of the **final** training set that carries the
trigger. ``mode="replace"`` swaps chosen clean images for their triggered copies (the set
keeps its size); ``mode="add"`` appends triggered copies (the set grows by
rate/(1-rate) of its size) so that they still make up ``rate`` of the result.

Dirty-label: a seeded draw of non-target images gets the trigger and the target label.
Clean-label (label-consistent): only target-class images are poisoned and keep their label;
for the ``clean-label`` trigger they are first made hard to learn with an untargeted PGD
perturbation against a model trained on clean data (Turner et al., 2019).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdbackdoor.attacks.pgd import pgd
from kdbackdoor.attacks.injection import inject_poisons, poison_count
from kdbackdoor.data.dataset import ImageDataset, Provenance, to_uint8
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.triggers import Trigger
from kdbackdoor.runtime import Seed

CLEAN_LABEL_TRIGGERS = ("sig", "clean-label")  # poisoned label-consistently unless told otherwise

RATE_HELP = ("share of the final training set that carries the trigger; 'replace' swaps clean "
             "images for triggered copies (size unchanged), 'add' appends triggered copies")


class PoisonConfig(BaseModel):
    """How a teacher's training set is poisoned."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    target: int = Field(0, ge=0, description="attacker's target class")
    rate: float = Field(0.1, gt=0, lt=1, description=RATE_HELP)
    mode: Literal["replace", "add"] = "replace"
    style: Literal["auto", "dirty", "clean"] = Field(
        "auto", description="dirty: relabel non-target images; clean: poison target-class images only; "
        f"auto: clean for {', '.join(CLEAN_LABEL_TRIGGERS)}, dirty otherwise")
    adv_eps: float = Field(16 / 255, ge=0, description="clean-label PGD radius (L∞, pixel units)")
    adv_steps: int = Field(10, ge=0)
    seed: Seed = 0

    def resolved_style(self, trigger: Trigger) -> str:
        if self.style != "auto":
            return self.style
        return "clean" if trigger.name in CLEAN_LABEL_TRIGGERS else "dirty"


def poison_training_set(
    data: ImageDataset,
    trigger: Trigger,
    config: PoisonConfig,
    *,
    adversary: torch.nn.Module | None = None,
    batch_size: int = 256,
) -> ImageDataset:
    """Return a poisoned copy of ``data`` with provenance (poisoned mask, source rows, labels).

    ``adversary``: a model trained on clean data, required for the ``clean-label`` trigger's
    PGD step (ignored otherwise).
    """
    if config.target >= data.num_classes:
        raise KDBackdoorError(f"target {config.target} out of range for {data.num_classes} classes")
    style = config.resolved_style(trigger)
    n = len(data)
    count = poison_count(n, config.rate, config.mode)
    labels = data.labels.cpu()
    eligible = (labels == config.target) if style == "clean" else (labels != config.target)
    pool = eligible.nonzero().squeeze(1)
    if count < 1:
        raise KDBackdoorError(f"poison rate {config.rate} gives no poisoned image on {n} images")
    if count > len(pool) and (config.mode == "replace" or style == "clean"):
        who = "target-class" if style == "clean" else "non-target"
        raise KDBackdoorError(
            f"poison rate {config.rate} needs {count} {who} images but {data.name or 'the data set'} has "
            f"{len(pool)}; the largest possible rate is {len(pool) / n:.4f}")
    generator = torch.Generator().manual_seed(config.seed)
    chosen = pool[torch.randperm(len(pool), generator=generator)[:count]] if count <= len(pool) else \
        pool[torch.randint(len(pool), (count,), generator=generator)]
    chosen, _ = chosen.sort()

    poisoned_images = _triggered(data, chosen, trigger, style, config, adversary, generator, batch_size)
    poisoned_labels = torch.full((count,), config.target, dtype=torch.int64)
    meta = {"poison": {**config.model_dump(), "style": style, "count": count, "trigger": trigger.config()}}
    return inject_poisons(data, chosen, poisoned_images, poisoned_labels, config.mode, meta=meta)


def _triggered(data, rows, trigger, style, config, adversary, generator, batch_size) -> torch.Tensor:
    """Triggered uint8 copies of ``data`` rows (after the clean-label PGD step where it applies)."""
    needs_pgd = style == "clean" and trigger.name == "clean-label" and config.adv_eps > 0 and config.adv_steps > 0
    if needs_pgd and adversary is None:
        raise KDBackdoorError("the clean-label trigger needs a model trained on clean data "
                              "(--adv-model CKPT) to make the poisons hard to learn")
    out = []
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        x = data.pixels(idx.to(data.images.device)).cpu()
        if needs_pgd:
            device = next(adversary.parameters()).device
            adversary.eval()
            x = pgd(adversary, x.to(device), data.labels[idx.to(data.labels.device)].to(device),
                    eps=config.adv_eps, step_size=config.adv_eps / 4, steps=config.adv_steps,
                    generator=generator).cpu()
        out.append(to_uint8(trigger(x)))
    return torch.cat(out)


def holdout_split(data: ImageDataset, share: float, seed: int) -> tuple[ImageDataset, torch.Tensor]:
    """Reserve a seeded ``share`` of ``data`` as clean holdout; return (rest, holdout rows)."""
    if not 0 <= share < 1:
        raise KDBackdoorError(f"holdout share must be in [0, 1), got {share}")
    n_hold = round(share * len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 7919))
    held, kept = order[:n_hold].sort()[0], order[n_hold:].sort()[0]
    rest = data.subset(kept)
    rest.provenance = Provenance(torch.zeros(len(kept), dtype=torch.bool), kept, data.labels.cpu()[kept])
    return rest, held
