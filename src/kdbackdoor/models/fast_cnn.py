"""A fast CIFAR network in the style of the airbench / ResNet-9 speed runs.

conv-BN-GELU stem, three blocks ``conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU``,
global max-pool, a bias-free linear layer and logits scaled by 1/9 (which keeps the
initial softmax soft with this wide, unnormalised head).
"""

from __future__ import annotations

import torch.nn as nn

from kdbackdoor.models.backbone import Backbone
from kdbackdoor.models.layers import HalvingMaxPool, conv3x3, conv_bn_act
from kdbackdoor.models.registry import register

LOGIT_SCALE = 1 / 9


def fast_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""
    return nn.Sequential(
        conv3x3(in_channels, out_channels), HalvingMaxPool(),
        nn.BatchNorm2d(out_channels), nn.GELU(),
        conv_bn_act(out_channels, out_channels, nn.GELU),
    )


def fast_cnn(stem_width: int, block_widths: list[int], num_classes: int, in_channels: int) -> Backbone:
    """The fast network with the given stem and block widths."""
    stages, channels = [], stem_width
    for width in block_widths:
        stages.append(fast_block(channels, width))
        channels = width
    pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return Backbone(
        conv_bn_act(in_channels, stem_width, nn.GELU), stages, pool,
        nn.Linear(channels, num_classes, bias=False), logit_scale=LOGIT_SCALE,
    )


@register("fast-cnn")
def fast_cnn_full(num_classes: int, in_channels: int) -> Backbone:
    return fast_cnn(32, [64, 256, 256], num_classes, in_channels)


@register("fast-cnn-half")
def fast_cnn_half(num_classes: int, in_channels: int) -> Backbone:
    return fast_cnn(24, [32, 128, 128], num_classes, in_channels)
