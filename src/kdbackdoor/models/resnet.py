"""ResNet-18/34, CIFAR variant: 3x3 stem at stride 1, no max-pool, four stages of basic blocks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdbackdoor.models.backbone import Backbone
from kdbackdoor.models.layers import conv3x3, conv_bn_act, global_avg_pool
from kdbackdoor.models.naming import Naming, cifar_normalisation, numbered
from kdbackdoor.models.registry import register

CIFAR_RESNET_NAMING = Naming(
    "cifar-resnet",
    "CIFAR ResNet of the data-free KD code bases (conv1, bn1, layer1-4, shortcut or downsample, "
    "linear or fc)",
    (
        (r"^conv1\.", "backbone.stem.0."),
        (r"^bn1\.", "backbone.stem.1."),
        (r"^layer(\d+)\.", numbered("backbone.stages.")),
        (r"\.downsample\.", ".shortcut."),
        (r"^(linear|fc)\.", "backbone.fc."),
    ),
    normalisation=cifar_normalisation,
    input_size=(32, 32),
)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


def resnet(blocks_per_stage: list[int], num_classes: int, in_channels: int) -> Backbone:
    """CIFAR ResNet with widths 64, 128, 256, 512 and the given number of blocks per stage."""
    stages, channels = [], 64
    for index, (width, count) in enumerate(zip([64, 128, 256, 512], blocks_per_stage)):
        blocks = []
        for i in range(count):
            blocks.append(BasicBlock(channels, width, 2 if index > 0 and i == 0 else 1))
            channels = width
        stages.append(nn.Sequential(*blocks))
    return Backbone(
        conv_bn_act(in_channels, 64), stages, global_avg_pool(), nn.Linear(channels, num_classes)
    )


@register("resnet18", namings=[CIFAR_RESNET_NAMING])
def resnet18(num_classes: int, in_channels: int) -> Backbone:
    return resnet([2, 2, 2, 2], num_classes, in_channels)


@register("resnet34", namings=[CIFAR_RESNET_NAMING])
def resnet34(num_classes: int, in_channels: int) -> Backbone:
    return resnet([3, 4, 6, 3], num_classes, in_channels)
