"""Activation clustering (Chen et al., 2018): within a class, poisons form their own small
cluster of penultimate activations."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.defenses.filters.base import (
    AuditContext, DataFilter, FilterParams, Scored, class_groups, register_filter,
)


class ActivationClusteringParams(FilterParams):
    group_by: Literal["prediction", "label"] = "prediction"
    components: int = Field(10, ge=1, description="PCA dimensions the activations are reduced to")
    max_share: float = Field(0.35, gt=0, lt=0.5, description="a cluster this small or smaller is flagged")


@register_filter("activation-clustering")
class ActivationClustering(DataFilter):
    """Per class (teacher prediction by default, or stored label): PCA of the teacher's
    penultimate activations to ``components`` dimensions, then 2-means. Score = 1 − the share
    of its class that a sample's cluster holds (0.5 for an even split, near 1 for a tiny
    cluster). Flags: members of a cluster holding at most ``max_share`` of its class."""

    description = "per-class 2-means on PCA-reduced teacher activations; the smaller cluster is suspect"
    Params = ActivationClusteringParams

    def score(self, data: ImageDataset, context: AuditContext) -> Scored:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        features = context.teacher_features(data).numpy()
        groups = class_groups(data, context, self.params.group_by)
        scores = torch.zeros(len(data))
        small_share = {}
        for c in groups.unique().tolist():
            rows = (groups == c).nonzero().squeeze(1)
            if len(rows) < 4:
                continue
            dims = min(self.params.components, len(rows) - 1, features.shape[1])
            reduced = PCA(dims, random_state=context.seed).fit_transform(features[rows.numpy()])
            assign = torch.from_numpy(KMeans(2, n_init=10, random_state=context.seed).fit_predict(reduced))
            share = torch.bincount(assign, minlength=2).float() / len(rows)
            scores[rows] = 1 - share[assign]
            small_share[data.classes[c]] = float(share.min())
        flags = scores >= 1 - self.params.max_share
        return Scored(scores, flags, f"member of a cluster holding ≤ {self.params.max_share:.0%} of its class",
                      {"smaller_cluster_share_per_class": small_share})
