"""ResNet-18/34/50, ImageNet variant as torchvision and timm build it.

7x7 stride-2 stem and a 3x3 stride-2 max-pool, four stages (64, 128, 256, 512 wide); ResNet-50's
bottleneck blocks put the stride on the 3x3 convolution ("v1.5", torchvision's and timm's
``resnet50``). Defaults: 224x224 input, ImageNet normalisation. Weights named as torchvision
and timm name them load through ``TORCHVISION_RESNET_NAMING``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdbackdoor.models.backbone import Backbone
from kdbackdoor.models.layers import conv3x3, global_avg_pool
from kdbackdoor.models.naming import Naming, numbered
from kdbackdoor.models.registry import IMAGENET_MEAN, IMAGENET_STD, register
from kdbackdoor.models.resnet import BasicBlock

TORCHVISION_RESNET_NAMING = Naming(
    "torchvision-resnet",
    "torchvision/timm ResNet (conv1, bn1, layer1-4 with downsample, fc)",
    (
        (r"^conv1\.", "backbone.stem.0."),
        (r"^bn1\.", "backbone.stem.1."),
        (r"^layer(\d+)\.", numbered("backbone.stages.")),
        (r"\.downsample\.", ".shortcut."),
        (r"^fc\.", "backbone.fc."),
    ),
)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class Bottleneck(nn.Module):
    """1x1 (width) - 3x3 (width, stride) - 1x1 (4 x width) convolutions, each with BN, plus a
    shortcut (1x1 conv + BN when the shape changes), ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def imagenet_resnet(bottleneck: bool, blocks_per_stage: list[int], num_classes: int, in_channels: int) -> Backbone:
    """ImageNet ResNet with basic (ResNet-18/34) or bottleneck (ResNet-50) blocks."""
    stem = nn.Sequential(
        nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    stages, channels = [], 64
    for index, (width, count) in enumerate(zip([64, 128, 256, 512], blocks_per_stage)):
        blocks: list[nn.Module] = []
        for i in range(count):
            stride = 2 if index > 0 and i == 0 else 1
            if bottleneck:
                blocks.append(Bottleneck(channels, width, stride))
                channels = width * Bottleneck.expansion
            else:
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
        stages.append(nn.Sequential(*blocks))
    return Backbone(stem, stages, global_avg_pool(), nn.Linear(channels, num_classes))


_SOURCE = dict(input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, namings=[TORCHVISION_RESNET_NAMING])


@register("resnet18-imagenet", **_SOURCE)
def resnet18_imagenet(num_classes: int, in_channels: int) -> Backbone:
    return imagenet_resnet(False, [2, 2, 2, 2], num_classes, in_channels)


@register("resnet34-imagenet", **_SOURCE)
def resnet34_imagenet(num_classes: int, in_channels: int) -> Backbone:
    return imagenet_resnet(False, [3, 4, 6, 3], num_classes, in_channels)


@register("resnet50-imagenet", **_SOURCE)
def resnet50_imagenet(num_classes: int, in_channels: int) -> Backbone:
    return imagenet_resnet(True, [3, 4, 6, 3], num_classes, in_channels)
