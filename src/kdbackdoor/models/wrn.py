"""Wide ResNet (Zagoruyko & Komodakis, 2016), CIFAR variant with pre-activation blocks.

WRN-d-k: depth d = 6n + 4 (n blocks per group), widths 16, 16k, 32k, 64k, no dropout.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdbackdoor.models.backbone import Backbone
from kdbackdoor.models.layers import conv3x3, global_avg_pool
from kdbackdoor.models.naming import Naming, cifar_normalisation, numbered
from kdbackdoor.models.registry import register

DATAFREE_WRN_NAMING = Naming(
    "datafree-wrn",
    "WideResNet of the data-free KD code bases (conv1, block<g>.layer.<i>.bn1/conv1/bn2/conv2, "
    "convShortcut, bn1, fc)",
    (
        (r"^conv1\.", "backbone.stem."),
        (r"^block(\d+)\.layer\.", numbered("backbone.stages.")),
        (r"\.convShortcut\.", ".shortcut."),
        (r"^bn1\.", "backbone.pool.0."),
        (r"^fc\.", "backbone.fc."),
    ),
    normalisation=cifar_normalisation,
    input_size=(32, 32),
)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # As in the reference WRN, a projecting shortcut sees the pre-activated input.
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int) -> Backbone:
    """WRN-``depth``-``widen`` backbone; its three groups are the stages."""
    blocks_per_group = (depth - 4) // 6
    widths = [16 * widen, 32 * widen, 64 * widen]
    groups, channels = [], 16
    for group, width in enumerate(widths):
        blocks = []
        for i in range(blocks_per_group):
            stride = 2 if group > 0 and i == 0 else 1
            blocks.append(PreActBlock(channels, width, stride))
            channels = width
        groups.append(nn.Sequential(*blocks))
    pool = global_avg_pool(nn.BatchNorm2d(channels), nn.ReLU())
    return Backbone(conv3x3(in_channels, 16), groups, pool, nn.Linear(channels, num_classes))


# WRN-d-k is registered as "wrn-d-k".
for _depth, _widen in [(16, 1), (16, 2), (40, 1), (40, 2)]:
    register(f"wrn-{_depth}-{_widen}", namings=[DATAFREE_WRN_NAMING])(partial(wide_resnet, _depth, _widen))
