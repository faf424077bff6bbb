"""VGG-11/16 with batch norm, CIFAR variant: five conv stages, each ending in a max-pool."""

from __future__ import annotations

import torch.nn as nn

from kdbackdoor.models.backbone import Backbone
from kdbackdoor.models.layers import HalvingMaxPool, conv_bn_act, global_avg_pool
from kdbackdoor.models.registry import register


def vgg(stage_widths: list[list[int]], num_classes: int, in_channels: int) -> Backbone:
    """Stages of conv-BN-ReLU layers with the given widths, each followed by a 2x2 max-pool."""
    stages, channels = [], in_channels
    for widths in stage_widths:
        layers = []
        for width in widths:
            layers.append(conv_bn_act(channels, width))
            channels = width
        stages.append(nn.Sequential(*layers, HalvingMaxPool()))
    return Backbone(nn.Identity(), stages, global_avg_pool(), nn.Linear(channels, num_classes))


@register("vgg11-bn")
def vgg11_bn(num_classes: int, in_channels: int) -> Backbone:
    return vgg([[64], [128], [256, 256], [512, 512], [512, 512]], num_classes, in_channels)


@register("vgg16-bn")
def vgg16_bn(num_classes: int, in_channels: int) -> Backbone:
    return vgg(
        [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
        num_classes, in_channels,
    )
