"""Putting poisons into a data set, with provenance for every sample.

``mode="replace"``: each poison takes the place of the image it was made from (the set keeps
its size). ``mode="add"``: poisons are appended (the set grows). Either way the result's
provenance marks the poisons and records, for every sample, its source row in the original
set and that row's original label.
"""

from __future__ import annotations

from typing import Literal

import torch

from kdbackdoor.data.dataset import ImageDataset, Provenance
from kdbackdoor.errors import KDBackdoorError

InjectionMode = Literal["replace", "add"]


def poison_count(size: int, rate: float, mode: InjectionMode) -> int:
    """How many poisons make up ``rate`` of the *final* set built from ``size`` clean images."""
    if not 0 < rate < 1:
        raise KDBackdoorError(f"poison rate must lie in (0, 1), got {rate}")
    return round(rate * size) if mode == "replace" else round(rate * size / (1 - rate))


def inject_poisons(
    data: ImageDataset, rows: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, mode: InjectionMode,
    *, name_suffix: str = "+poison", meta: dict | None = None,
) -> ImageDataset:
    """A copy of ``data`` with ``images`` (uint8, (P,C,H,W)) made from ``data`` rows ``rows`` (P,).

    ``labels`` (P,) are the poisons' labels. In ``replace`` mode ``rows`` must be distinct.
    """
    rows, labels = rows.cpu(), labels.cpu().to(torch.int64)
    if not (len(rows) == len(images) == len(labels)):
        raise KDBackdoorError(f"{len(rows)} rows, {len(images)} poison images and {len(labels)} labels differ")
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != data.image_shape:
        raise KDBackdoorError(f"poisons must be uint8 {data.image_shape}, got {images.dtype} {tuple(images.shape[1:])}")
    base = data.provenance or Provenance.clean(data.labels.cpu())
    all_images, all_labels = data.images.cpu(), data.labels.cpu()
    if mode == "replace":
        if len(rows.unique()) != len(rows):
            raise KDBackdoorError("replace mode needs distinct rows")
        all_images, all_labels = all_images.clone(), all_labels.clone()
        all_images[rows] = images.cpu()
        all_labels[rows] = labels
        provenance = Provenance(base.poisoned.clone(), base.source_index.clone(), base.original_label.clone())
        provenance.poisoned[rows] = True
    elif mode == "add":
        all_images = torch.cat([all_images, images.cpu()])
        all_labels = torch.cat([all_labels, labels])
        added = Provenance(torch.ones(len(rows), dtype=torch.bool), base.source_index[rows],
                           base.original_label[rows])
        provenance = Provenance.concat([base, added])
    else:
        raise KDBackdoorError(f"unknown injection mode {mode!r}; use replace or add")
    return ImageDataset(all_images, all_labels, list(data.classes), f"{data.name}{name_suffix}",
                        {**data.meta, **(meta or {})}, provenance)
