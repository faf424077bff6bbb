"""The common interface of distillation-set filters, their registry, flag rules and scoring.

A filter scores every sample of a distillation set (higher = more suspicious) and flags
suspects. Deciding uses only the images, the stored labels and the models: never the
provenance. ``score_against_provenance`` measures a result against the ground truth
afterwards, for reports.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.features import capture
from kdbackdoor.numerics import autocast
from kdbackdoor.registry import Registry
from kdbackdoor.runtime import Seed

OUTLIER_MADS = 3.5
"""Default flag rule: a score above median + 3.5 robust standard deviations (1.4826·MAD)."""


@dataclass
class AuditContext:
    """What a filter may use besides the data: the models, the device, a seed, the batch size."""

    teacher: torch.nn.Module
    device: torch.device
    reference: torch.nn.Module | None = None
    seed: Seed = 0
    batch_size: int = 256
    _cache: dict = field(default_factory=dict, repr=False)

    def teacher_probabilities(self, data: ImageDataset) -> torch.Tensor:
        """The teacher's softmax (N, K) on ``data``, computed once per data set and shared by filters."""
        return self._cached("probabilities", data, lambda: probabilities(self.teacher, data, self))

    def teacher_features(self, data: ImageDataset) -> torch.Tensor:
        """The teacher's penultimate features (N, D) on ``data``, computed once per data set."""
        return self._cached("features", data, lambda: penultimate_features(self.teacher, data, self))

    def _cached(self, what: str, data: ImageDataset, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (what, id(data))
        if key not in self._cache:
            self._cache[key] = (data, compute())  # holding data keeps its id from being reused
        return self._cache[key][1]


@dataclass
class Scored:
    """A filter's raw output: scores (N,) and, if the filter has a natural decision, its flags."""

    scores: torch.Tensor
    flags: torch.Tensor | None = None
    rule: str | None = None
    details: dict = field(default_factory=dict)


@dataclass
class FilterResult:
    """Scores (float (N,), higher = more suspicious), flags (bool (N,)) and the rule that set them."""

    name: str
    scores: torch.Tensor
    flags: torch.Tensor
    rule: str
    params: dict
    details: dict = field(default_factory=dict)


class FilterParams(BaseModel):
    """Base of every filter's parameters (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataFilter(ABC):
    """A distillation-set filter. Subclasses set ``Params`` and implement ``score``."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[FilterParams]] = FilterParams

    def __init__(self, **params) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise KDBackdoorError(f"filter {self.name!r}: invalid parameter ({problems}); "
                                  f"allowed: {', '.join(self.Params.model_fields) or 'none'}") from None

    @abstractmethod
    def score(self, data: ImageDataset, context: AuditContext) -> Scored:
        """Score every sample of ``data`` (never reading ``data.provenance``)."""

    def detect(self, data: ImageDataset, context: AuditContext, expected_rate: float | None = None) -> FilterResult:
        """Scores and flags. With ``expected_rate`` the top share of scores is flagged; otherwise
        the filter's own decision if it has one, else the outlier rule (``OUTLIER_MADS``)."""
        scored = self.score(data, context)
        if expected_rate is not None:
            flags, rule = flag_top_share(scored.scores, expected_rate)
        elif scored.flags is not None:
            flags, rule = scored.flags, scored.rule or "the filter's own decision"
        else:
            flags, rule = flag_outliers(scored.scores)
        return FilterResult(self.name, scored.scores.float().cpu(), flags.bool().cpu(), rule,
                            self.params.model_dump(), scored.details)


FILTERS: Registry[type[DataFilter]] = Registry("filter", hint=" (or all)", names_items=True)
register_filter = FILTERS.register
"""Class decorator: ``@register_filter("name")`` makes the filter buildable as ``name``."""


def available_filters() -> dict[str, str]:
    """``{name: one-line description}`` of every registered filter, in registration order."""
    return {name: cls.description for name, cls in FILTERS.items()}


def build_filter(name: str, **params) -> DataFilter:
    """The filter registered as ``name`` with ``params``; a KDBackdoorError names what exists."""
    return FILTERS[name](**params)


def flag_top_share(scores: torch.Tensor, rate: float) -> tuple[torch.Tensor, str]:
    """Flag the ceil(rate·N) highest scores (ties broken by row order)."""
    if not 0 < rate < 1:
        raise KDBackdoorError(f"expected rate must lie in (0, 1), got {rate}")
    count = math.ceil(rate * len(scores))
    flags = torch.zeros(len(scores), dtype=torch.bool)
    flags[torch.argsort(scores.cpu(), descending=True, stable=True)[:count]] = True
    return flags, f"top {rate:.2%} of scores ({count} samples)"


def flag_outliers(scores: torch.Tensor, mads: float = OUTLIER_MADS) -> tuple[torch.Tensor, str]:
    """Flag scores above median + ``mads`` · 1.4826 · MAD (a robust z-score above ``mads``)."""
    scores = scores.float().cpu()
    median = scores.median()
    spread = 1.4826 * (scores - median).abs().median()
    threshold = float(median + mads * spread)
    return scores > threshold, f"score > median + {mads}·1.4826·MAD = {threshold:.4g}"


def score_against_provenance(result: FilterResult, poisoned: torch.Tensor) -> dict:
    """Detection quality of ``result`` against the true poison mask (for reports only).

    ``auroc`` of the scores and ``tpr_at_5fpr`` (the best true-positive rate at a false-positive
    rate of at most 5%) are None when the set has no poison or only poison; ``precision`` is
    None when nothing is flagged. Rates are shares in [0, 1].
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    truth = poisoned.bool().cpu().numpy()
    scores = result.scores.double().cpu().numpy()
    flags = result.flags.cpu().numpy()
    hits = int((flags & truth).sum())
    out = {"flagged": int(flags.sum()), "poisons": int(truth.sum()), "true_positives": hits,
           "precision": hits / int(flags.sum()) if flags.any() else None,
           "recall": hits / int(truth.sum()) if truth.any() else None,
           "auroc": None, "tpr_at_5fpr": None}
    if truth.any() and not truth.all():
        fpr, tpr, _ = roc_curve(truth, scores)
        out["auroc"] = float(roc_auc_score(truth, scores))
        out["tpr_at_5fpr"] = float(tpr[fpr <= 0.05].max())
    return out


@torch.no_grad()
def probabilities(model: torch.nn.Module, data: ImageDataset, context: AuditContext,
                  transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Softmax outputs (N, K), float on CPU, of ``model`` in eval mode on ``data``; ``transform``
    maps each pixel batch (float [0, 1], (B, C, H, W)) before the model."""
    model.eval()
    out = []
    for x, _, _ in data.batches(context.batch_size, device=context.device):
        if transform is not None:
            x = transform(x)
        with autocast(context.device):
            out.append(model(x).float().softmax(1).cpu())
    return torch.cat(out)


def class_groups(data: ImageDataset, context: AuditContext, group_by: str) -> torch.Tensor:
    """Per-sample class (N,) that per-class filters group by: the teacher's top-1 class
    (``prediction``) or the stored label (``label``)."""
    if group_by == "prediction":
        return context.teacher_probabilities(data).argmax(1)
    return data.labels.cpu()


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, data: ImageDataset, context: AuditContext) -> torch.Tensor:
    """The model's penultimate feature vectors (N, D), float on CPU (``model.feature_name``)."""
    name = getattr(model, "feature_name", None)
    if name is None:
        raise KDBackdoorError("this filter needs a kdbackdoor classifier (its penultimate features)")
    model.eval()
    out = []
    with capture(model, [name]) as features:
        for x, _, _ in data.batches(context.batch_size, device=context.device):
            with autocast(context.device):
                model(x)
            out.append(features[name].float().flatten(1).cpu())
    return torch.cat(out)
