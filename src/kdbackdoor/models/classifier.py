"""The model wrapper: pixel-space input, normalisation inside, logits out."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.backbone import Backbone


class Classifier(nn.Module):
    """An image classifier taking pixel-space input.

    ``forward(x)``: x is float (N, C, H, W) in [0, 1]; it is normalised with the per-channel
    ``mean``/``std`` buffers (shape (1, C, 1, 1), saved in the state dict) and passed to the
    backbone. Returns logits (N, num_classes). ``input_size`` (H, W) records the resolution the
    model was built for; any size of at least 8 px runs.
    """

    def __init__(
        self, backbone: Backbone, *, arch: str, num_classes: int, in_channels: int,
        input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def stage_names(self) -> list[str]:
        """Names (relative to this model) of the modules whose outputs are the stage outputs."""
        return [f"backbone.stages.{i}" for i in range(len(self.backbone.stages))]

    @property
    def feature_name(self) -> str:
        """Name of the module whose output is the penultimate feature vector (N, D)."""
        return "backbone.pool"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise KDBackdoorError(
                f"{self.arch} expects pixel images of shape (N, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        return self.backbone((x - self.mean) / self.std)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """All convolutions of ``model`` with their names, in forward order (for the built-in nets)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
