"""Metrics, defined once: ACC, per-class accuracy, ASR and per-source-class ASR.

ACC = top-1 accuracy on the clean test set.
ASR = share of test images whose true label != target that the model assigns to the
target once the trigger is applied (target-class images are excluded). Beside it, the share
of the same images the model assigns to the target *without* the trigger, so that a model
which says the target to everything is not read as backdoored.
"""

from __future__ import annotations

from typing import Callable

import torch

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.compatibility import check_compatible
from kdbackdoor.numerics import autocast

PixelTransform = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict(
    model: torch.nn.Module, data: ImageDataset, *, device: torch.device | None = None,
    batch_size: int = 512, transform: PixelTransform | None = None,
) -> torch.Tensor:
    """Predicted labels (N,) on CPU; ``transform`` maps pixel batches [0,1] before the model."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds = []
    try:
        for x, _, _ in data.batches(batch_size, device=device):
            if transform is not None:
                x = transform(x)
            with autocast(device):
                preds.append(model(x).argmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds)


def _per_class_rate(hits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float]:
    out = {}
    for c, name in enumerate(classes):
        sel = labels == c
        if sel.any():
            out[name] = float(hits[sel].float().mean())
    return out


def accuracy(model: torch.nn.Module, data: ImageDataset, **kwargs) -> dict:
    """``{"acc": top-1 in [0,1], "per_class": {class: acc}, "n": count}`` on ``data``."""
    check_compatible(model, data)
    return _accuracy_from_predictions(predict(model, data, **kwargs), data)


def _accuracy_from_predictions(predictions: torch.Tensor, data: ImageDataset) -> dict:
    hits = predictions == data.labels.cpu()
    return {
        "acc": float(hits.float().mean()),
        "per_class": _per_class_rate(hits, data.labels.cpu(), data.classes),
        "n": len(data),
    }


def target_rate_without_trigger(predictions: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """Share of non-target images predicted as ``target`` with no trigger applied: the level ASR
    (measured on the same images) must rise above before the trigger can be said to cause it."""
    others = labels.cpu() != target
    return float((predictions[others] == target).float().mean()) if others.any() else 0.0


def attack_success_rate(
    model: torch.nn.Module, data: ImageDataset, trigger: PixelTransform, target: int, **kwargs,
) -> dict:
    """ASR of ``trigger`` towards ``target`` on ``data`` (target-class images excluded).

    Returns ``{"asr": share in [0,1], "per_source_class": {class: asr}, "n": count}``.
    Applied to a clean model this is the trigger's baseline ASR.
    """
    check_compatible(model, data)
    if not 0 <= target < data.num_classes:
        raise KDBackdoorError(f"target {target} out of range for {data.num_classes} classes")
    source = data.subset(data.labels != target)
    hits = predict(model, source, transform=trigger, **kwargs) == target
    per_class = _per_class_rate(hits, source.labels.cpu(), data.classes)
    return {"asr": float(hits.float().mean()), "per_source_class": per_class, "n": len(source)}


def trigger_sensitivity(asr: dict, data: ImageDataset, source_classes: list[int]) -> dict:
    """Split an ``attack_success_rate`` result into the chosen source classes and the rest.

    ``asr_on_sources``: ASR over test images of ``source_classes``; ``false_positive_rate``:
    the same share over the other non-target classes (the trigger should do nothing there
    when the attack was aimed at the sources only). Weighted by class counts in ``data``.
    """
    counts = torch.bincount(data.labels.cpu(), minlength=data.num_classes)

    def pooled(names: list[str]) -> float | None:
        n = sum(int(counts[data.classes.index(name)]) for name in names)
        if n == 0:
            return None
        return sum(asr["per_source_class"][name] * int(counts[data.classes.index(name)]) for name in names) / n

    sources = {data.classes[c] for c in source_classes}
    inside = [name for name in asr["per_source_class"] if name in sources]
    outside = [name for name in asr["per_source_class"] if name not in sources]
    return {"asr_on_sources": pooled(inside), "false_positive_rate": pooled(outside),
            "source_classes": inside, "other_classes": outside}


def model_metrics(
    model: torch.nn.Module, data: ImageDataset, *, trigger: PixelTransform | None = None,
    target: int | None = None, source_classes: list[int] | None = None, **kwargs,
) -> dict:
    """The run-record metrics: ``acc``, ``per_class_acc``; with a trigger ``asr``,
    ``per_source_class_asr`` and ``target_without_trigger`` (see ``target_rate_without_trigger``);
    with restricted ``source_classes`` also ``trigger_sensitivity``. Shares in [0, 1]."""
    check_compatible(model, data)
    predictions = predict(model, data, **kwargs)
    acc = _accuracy_from_predictions(predictions, data)
    metrics = {"acc": acc["acc"], "per_class_acc": acc["per_class"]}
    if trigger is not None:
        asr = attack_success_rate(model, data, trigger, target, **kwargs)
        metrics.update(asr=asr["asr"], per_source_class_asr=asr["per_source_class"],
                       target_without_trigger=target_rate_without_trigger(predictions, data.labels, target))
        if source_classes:
            metrics["trigger_sensitivity"] = trigger_sensitivity(asr, data, source_classes)
    return metrics


def check_same_classes(train: ImageDataset, test: ImageDataset) -> None:
    """Fail clearly when a test split's classes (names, in label order) or image shape differ from
    the training split's: its ACC and ASR would score the wrong labels."""
    if list(train.classes) != list(test.classes):
        only_train = [c for c in train.classes if c not in test.classes]
        only_test = [c for c in test.classes if c not in train.classes]
        detail = ("; ".join(part for part in (only_train and f"only in training: {', '.join(only_train[:5])}",
                                               only_test and f"only in test: {', '.join(only_test[:5])}") if part)
                  or "same names in another order")
        raise KDBackdoorError(
            f"test split {test.name!r} has {test.num_classes} classes and training split {train.name!r} "
            f"{train.num_classes}, not the same ({detail}); both splits must list the same classes in the same order")
    if train.image_shape != test.image_shape:
        raise KDBackdoorError(f"test split {test.name!r} has images of shape {tuple(test.image_shape)}, training "
                              f"split {train.name!r} {tuple(train.image_shape)}; load both with the same --resize")

