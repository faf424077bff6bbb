"""Label/teacher disagreement: a stored label the clean teacher does not believe is suspicious."""

from __future__ import annotations

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.defenses.filters.base import AuditContext, DataFilter, Scored, register_filter


@register_filter("label-disagreement")
class LabelDisagreement(DataFilter):
    """Score 1 − p_teacher(stored label | image) in [0, 1]; flag where the teacher's top-1
    class differs from the stored label."""

    description = "1 − teacher probability of the stored label; flags teacher top-1 ≠ label"

    def score(self, data: ImageDataset, context: AuditContext) -> Scored:
        p = context.teacher_probabilities(data)
        labels = data.labels.cpu()
        scores = 1 - p.gather(1, labels[:, None]).squeeze(1)
        return Scored(scores, p.argmax(1) != labels, "teacher top-1 class ≠ stored label")
