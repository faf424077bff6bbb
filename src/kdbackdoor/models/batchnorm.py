"""Keeping a model's BatchNorm running statistics out of auxiliary forward passes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.nn as nn


@contextmanager
def preserved_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """Inside the block the model runs as usual (batch statistics in train mode), but on exit
    every BatchNorm layer's running mean, variance and batch count are restored, so passes on
    perturbed or otherwise unusual inputs leave no trace in them."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    try:
        yield
    finally:
        for m, (mean, var, count) in zip(layers, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
