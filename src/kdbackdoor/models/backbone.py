"""The common shape of every architecture: stem -> stages -> global pool -> linear."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from kdbackdoor.models.layers import init_weights


class Backbone(nn.Module):
    """A network on normalised input, returning logits.

    Submodule names are fixed so that features can be found by name: ``stages.<i>`` are the
    network's stages (e.g. the groups of a WRN), ``pool`` yields the penultimate feature vector
    (N, D) and ``fc`` is the final linear layer. Logits are multiplied by ``logit_scale``.
    Modules are registered in the order they run, so ``named_modules`` follows the forward pass.
    """

    def __init__(
        self, stem: nn.Module, stages: Sequence[nn.Module], pool: nn.Module, fc: nn.Linear,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.pool = pool
        self.fc = fc
        self.logit_scale = logit_scale
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x)))) * self.logit_scale
