"""Reference-model disagreement: a poison crafted against the teacher rarely fools another model."""

from __future__ import annotations

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.defenses.filters.base import AuditContext, DataFilter, Scored, probabilities, register_filter
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.compatibility import check_compatible


@register_filter("reference-model")
class ReferenceModel(DataFilter):
    """Score = p_teacher(ŷ | x) − p_reference(ŷ | x), ŷ the teacher's top-1 class, in [−1, 1]:
    how much more the teacher believes its answer than an independent model does.
    Flags: the two models' top-1 classes differ."""

    description = "teacher vs a second (--reference) model: confidence gap on the teacher's class"

    def score(self, data: ImageDataset, context: AuditContext) -> Scored:
        if context.reference is None:
            raise KDBackdoorError("filter 'reference-model' needs a second model: pass --reference CKPT")
        check_compatible(context.reference, data)
        p = context.teacher_probabilities(data)
        q = probabilities(context.reference, data, context)
        top = p.argmax(1, keepdim=True)
        scores = (p.gather(1, top) - q.gather(1, top)).squeeze(1)
        return Scored(scores, q.argmax(1) != top.squeeze(1), "teacher top-1 ≠ reference top-1",
                      {"top1_agreement": float((q.argmax(1) == top.squeeze(1)).float().mean())})
