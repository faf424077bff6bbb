"""Building blocks shared by the architectures: convolutions, pooling, weight init."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a batch norm always follows or precedes it)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv_bn_act(
    in_channels: int, out_channels: int, activation: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """conv3x3 -> BatchNorm -> activation, keeping the spatial size."""
    return nn.Sequential(conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels), activation())


def global_avg_pool(*before: nn.Module) -> nn.Sequential:
    """``before`` modules, then average over space and flatten: (N, C, H, W) -> (N, C)."""
    return nn.Sequential(*before, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class HalvingMaxPool(nn.Module):
    """2x2 max-pool along every spatial side of at least 2 px; a 1 px side is left as it is.

    This lets the deep pooling networks run on inputs as small as 8x8 (and non-square ones).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = tuple(2 if side >= 2 else 1 for side in x.shape[-2:])
        if kernel == (1, 1):
            return x
        return F.max_pool2d(x, kernel)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit/zero batch norms, zero biases (apply with ``Module.apply``).

    Linear weights keep PyTorch's default init. Deterministic under ``torch.manual_seed``.
    Meta tensors (shape-only models) are skipped: they hold no values, and ``normal_`` on meta
    would import torch._dynamo, seconds of CPU.
    """
    if any(p.is_meta for p in module.parameters(recurse=False)):
        return
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
    if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and module.bias is not None:
        nn.init.zeros_(module.bias)
