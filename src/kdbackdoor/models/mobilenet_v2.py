"""MobileNetV2 (width 1.0) as torchvision builds it.

A 3x3 stride-2 stem (32 channels), seven stages of inverted-residual blocks (expansion t,
width c, n blocks, first stride s), a 1x1 convolution to 1280 channels, global average pool,
dropout 0.2 and the classifier; ReLU6 activations. Defaults: 224x224 input, ImageNet
normalisation. torchvision's names (``features.<i>``, ``classifier.1``) and timm's
``mobilenetv2_100`` names (``conv_stem``, ``blocks.<s>.<i>``, ``conv_head``) both load.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from kdbackdoor.models.backbone import Backbone
from kdbackdoor.models.naming import Naming, indexed
from kdbackdoor.models.registry import IMAGENET_MEAN, IMAGENET_STD, register

SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
"""(expansion, width, blocks, first stride) per stage."""
STEM, HEAD = 32, 1280


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """[1x1 expansion] - 3x3 depthwise (stride) - 1x1 linear projection; a residual when the shape
    is kept. Submodules are named as torchvision names them (``conv.<i>``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2_backbone(num_classes: int, in_channels: int) -> Backbone:
    stages, channels = [], STEM
    for expansion, width, count, stride in SETTINGS:
        stages.append(nn.Sequential(*[
            InvertedResidual(channels if i == 0 else width, width, stride if i == 0 else 1, expansion)
            for i in range(count)
        ]))
        channels = width
    head = nn.Sequential(conv_bn_relu6(channels, HEAD, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2))
    return Backbone(conv_bn_relu6(in_channels, STEM, 3, 2), stages, head, nn.Linear(HEAD, num_classes))


def _torchvision_naming() -> Naming:
    table, index = {0: "backbone.stem."}, 1
    for stage, (_, _, count, _) in enumerate(SETTINGS):
        for block in range(count):
            table[index] = f"backbone.stages.{stage}.{block}."
            index += 1
    table[index] = "backbone.pool.0."
    return Naming(
        "torchvision-mobilenet-v2",
        "torchvision MobileNetV2 (features.<i>, classifier.1)",
        ((r"^features\.(\d+)\.", indexed(table)), (r"^classifier\.1\.", "backbone.fc.")),
    )


# timm's inverted residual: conv_pw/bn1 (expansion), conv_dw/bn2 (depthwise), conv_pwl/bn3;
# its first block has no expansion: conv_dw/bn1, conv_pw/bn2.
_TIMM_FIRST_BLOCK = {"conv_dw": "conv.0.0", "bn1": "conv.0.1", "conv_pw": "conv.1", "bn2": "conv.2"}
_TIMM_BLOCK = {"conv_pw": "conv.0.0", "bn1": "conv.0.1", "conv_dw": "conv.1.0", "bn2": "conv.1.1",
               "conv_pwl": "conv.2", "bn3": "conv.3"}


def _timm_block(match: re.Match[str]) -> str:
    stage, block, layer = int(match[1]), int(match[2]), match[3]
    names = _TIMM_FIRST_BLOCK if stage == 0 else _TIMM_BLOCK
    return f"backbone.stages.{stage}.{block}.{names.get(layer, layer)}."


TIMM_MOBILENET_V2_NAMING = Naming(
    "timm-mobilenetv2",
    "timm mobilenetv2_100 (conv_stem, bn1, blocks.<s>.<i>, conv_head, bn2, classifier)",
    (
        (r"^conv_stem\.", "backbone.stem.0."),
        (r"^bn1\.", "backbone.stem.1."),
        (r"^blocks\.(\d+)\.(\d+)\.(\w+)\.", _timm_block),
        (r"^conv_head\.", "backbone.pool.0.0."),
        (r"^bn2\.", "backbone.pool.0.1."),
        (r"^classifier\.", "backbone.fc."),
    ),
)

register(
    "mobilenet-v2", input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
    namings=[_torchvision_naming(), TIMM_MOBILENET_V2_NAMING],
)(mobilenet_v2_backbone)
