"""VGG-11/16 with batch norm, ImageNet variant as torchvision builds it.

Five stages of 3x3 conv (with bias) - BN - ReLU layers, each ending in a 2x2 max-pool, then a
7x7 adaptive average pool and two 4096-wide hidden layers with dropout. The penultimate feature
is the second hidden layer's output. Defaults: 224x224 input, ImageNet normalisation; at least
32 px a side (five halvings). Weights named as torchvision names them (``features.<i>``,
``classifier.0/3/6``) load through the naming built for each depth.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn

from kdbackdoor.models.backbone import Backbone
from kdbackdoor.models.naming import Naming, indexed
from kdbackdoor.models.registry import IMAGENET_MEAN, IMAGENET_STD, register

HIDDEN = 4096
POOLED = 7
STAGES = {
    "vgg11-bn-imagenet": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16-bn-imagenet": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


def imagenet_vgg(stage_widths: list[list[int]], num_classes: int, in_channels: int) -> Backbone:
    stages, channels = [], in_channels
    for widths in stage_widths:
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        stages.append(nn.Sequential(*layers, nn.MaxPool2d(2, 2)))
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(POOLED), nn.Flatten(),
        nn.Linear(channels * POOLED * POOLED, HIDDEN), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Dropout(0.5),
    )
    return Backbone(nn.Identity(), stages, head, nn.Linear(HIDDEN, num_classes))


def torchvision_vgg_naming(stage_widths: list[list[int]]) -> Naming:
    """torchvision's flat ``features.<i>`` indices mapped onto the stages, ``classifier.0/3/6``
    onto the head and the final layer."""
    table, index = {}, 0
    for stage, widths in enumerate(stage_widths):
        for position in range(3 * len(widths) + 1):  # conv, BN, ReLU per layer, then the max-pool
            table[index] = f"backbone.stages.{stage}.{position}."
            index += 1
    return Naming(
        "torchvision-vgg",
        "torchvision VGG-BN (features.<i>, classifier.0/3/6)",
        (
            (r"^features\.(\d+)\.", indexed(table)),
            (r"^classifier\.(\d+)\.", indexed({0: "backbone.pool.2.", 3: "backbone.pool.5.", 6: "backbone.fc."})),
        ),
    )


for _name, _widths in STAGES.items():
    register(
        _name, input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, min_input_size=32,
        min_input_reason="five 2x2 max-pools", namings=[torchvision_vgg_naming(_widths)],
    )(partial(imagenet_vgg, _widths))
