"""A tiny CNN (about 24k parameters) for the 8x8 digits data and fast tests."""

from __future__ import annotations

import torch.nn as nn

from kdbackdoor.models.backbone import Backbone
from kdbackdoor.models.layers import HalvingMaxPool, conv_bn_act, global_avg_pool
from kdbackdoor.models.registry import register


@register("small-cnn")
def small_cnn(num_classes: int, in_channels: int) -> Backbone:
    """Three conv-BN-ReLU stages (16, 32, 64 channels), a max-pool after the second."""
    stages = [
        conv_bn_act(in_channels, 16),
        nn.Sequential(conv_bn_act(16, 32), HalvingMaxPool()),
        conv_bn_act(32, 64),
    ]
    return Backbone(nn.Identity(), stages, global_avg_pool(), nn.Linear(64, num_classes))
