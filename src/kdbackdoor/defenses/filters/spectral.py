"""Spectral signatures (Tran, Li & Madry, 2018): poisons leave a trace along the top singular
direction of a class's centred penultimate features."""

from __future__ import annotations

from typing import Literal

import torch

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.defenses.filters.base import (
    AuditContext, DataFilter, FilterParams, Scored, class_groups, register_filter,
)


class SpectralParams(FilterParams):
    group_by: Literal["prediction", "label"] = "prediction"


@register_filter("spectral")
class Spectral(DataFilter):
    """Per class (the teacher's prediction by default, or the stored label), centre the teacher's
    penultimate features and project them on their top right-singular vector. Score = squared
    projection divided by its class mean (dimensionless: 1 is a typical sample of the class),
    so scores of different classes compare. Flags: outlier rule."""

    description = "squared projection on the top singular direction of per-class teacher features"
    Params = SpectralParams

    def score(self, data: ImageDataset, context: AuditContext) -> Scored:
        features = context.teacher_features(data).double()
        groups = class_groups(data, context, self.params.group_by)
        scores = torch.zeros(len(data), dtype=torch.float64)
        for c in groups.unique():
            rows = (groups == c).nonzero().squeeze(1)
            if len(rows) < 2:
                continue
            centred = features[rows] - features[rows].mean(0)
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            projection = (centred @ vh[0]) ** 2
            scores[rows] = projection / projection.mean().clamp_min(1e-12)
        return Scored(scores.float())
