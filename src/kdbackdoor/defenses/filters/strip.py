"""STRIP as a data filter: samples whose teacher prediction survives blending with other
images (low entropy) are suspicious. Meant for triggers the model reacts to; see
``kdbackdoor.defenses.strip``."""

from __future__ import annotations

import torch
from pydantic import Field

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.defenses.filters.base import AuditContext, DataFilter, FilterParams, Scored, register_filter
from kdbackdoor.defenses.strip import strip_entropy
from kdbackdoor.runtime import cpu_generator


class StripParams(FilterParams):
    blends: int = Field(16, ge=1, description="blends per image")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the audited image in each blend")
    pool: int = Field(512, ge=1, description="overlay images drawn (seeded) from the set itself")


@register_filter("strip")
class Strip(DataFilter):
    """Score = −(mean teacher prediction entropy in nats over ``blends`` blends with images
    drawn from the set itself): higher = more confident under blending = more suspicious.
    Flags: outlier rule."""

    description = "teacher entropy under blending with other images of the set (low = suspect)"
    Params = StripParams

    def score(self, data: ImageDataset, context: AuditContext) -> Scored:
        generator = cpu_generator(context.seed)
        pool = torch.randperm(len(data), generator=generator)[:self.params.pool]
        overlays = data.pixels(pool.to(data.images.device))
        entropy = torch.cat([
            strip_entropy(context.teacher, x, overlays, self.params.blends, self.params.alpha, generator,
                          context.batch_size)
            for x, _, _ in data.batches(context.batch_size)
        ])
        return Scored(-entropy, details={"mean_entropy_nats": float(entropy.mean())})
