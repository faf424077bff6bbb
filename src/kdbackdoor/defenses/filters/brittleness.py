"""Prediction brittleness: adversarially crafted images lose their class under small changes.

The teacher's probability of its own top-1 class on the stored image is compared with its
probability of that class on small views of the image (Gaussian noise, blur, JPEG
re-encoding, crop+flip; see ``kdbackdoor.defenses.views``). Clean images keep it; PGD-style
poisons sit just across a decision boundary and fall back.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.defenses.filters.base import (
    AuditContext, DataFilter, FilterParams, Scored, probabilities, register_filter,
)
from kdbackdoor.defenses.views import ViewConfig, apply_view, is_random
from kdbackdoor.runtime import cpu_generator


class BrittlenessParams(ViewConfig, FilterParams):
    """The views (kinds and strengths, see ``ViewConfig``) and how often random ones are drawn."""

    jpeg_quality: int = Field(30, ge=1, le=100, description="JPEG quality (stronger than for robust-kd: "
                              "only the ranking matters here)")
    draws: int = Field(2, ge=1, description="draws per random view kind (noise, crop-flip)")


@register_filter("brittleness")
class Brittleness(DataFilter):
    """Score = mean over views of p_teacher(ŷ | x) − p_teacher(ŷ | view(x)), ŷ the teacher's
    top-1 class on x: the confidence the prediction loses, in [−1, 1]. Flags: outlier rule."""

    description = "teacher confidence lost under noise / blur / JPEG / crop-flip views"
    Params = BrittlenessParams

    def score(self, data: ImageDataset, context: AuditContext) -> Scored:
        views: ViewConfig = self.params
        generator = cpu_generator(context.seed)
        p = context.teacher_probabilities(data)
        top = p.argmax(1, keepdim=True)
        confidence = p.gather(1, top).squeeze(1)
        drops, per_kind, flips = [], {}, torch.zeros(len(data))
        for kind in views.kinds:
            kind_drops = []
            for _ in range(self.params.draws if is_random(kind) else 1):
                q = probabilities(context.teacher, data, context,
                                  transform=lambda x, kind=kind: apply_view(x, kind, views, generator))
                kind_drops.append(confidence - q.gather(1, top).squeeze(1))
                flips += (q.argmax(1) != top.squeeze(1)).float()
            drops += kind_drops
            per_kind[kind] = float(torch.stack(kind_drops).mean())
        scores = torch.stack(drops).mean(0)
        details = {"mean_confidence_drop_per_view": per_kind,
                   "share_of_views_changing_top1_mean": float((flips / len(drops)).mean())}
        return Scored(scores, details=details)
