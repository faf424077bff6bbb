"""Resizing trigger images to the data's resolution.

``antialias`` follows scikit-image's ``resize`` (order 1, anti_aliasing on), which ABD uses
to bring its 540×540 blend image to 32×32: along each axis that shrinks by a factor f,
a Gaussian low-pass with σ = (f − 1)/2 (mirrored edges, truncated at 4σ), then linear
interpolation at pixel centres. Shrinking therefore matches scikit-image; when enlarging,
the border half-pixel repeats the edge value where scikit-image mirrors.
``nearest`` takes, for each output pixel, the input pixel under its centre.

Both are separable, so each is one (target × length) matrix per axis.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ResizeMethod = Literal["antialias", "nearest"]


def resize(image: torch.Tensor, size: tuple[int, int], method: ResizeMethod) -> torch.Tensor:
    """Resize a (K, h, w) float64 image to (K, H, W), ``size`` = (H, W), with ``method``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image  # both methods are the identity here
    rows = _axis_matrix(image.shape[-2], size[0], method)
    cols = _axis_matrix(image.shape[-1], size[1], method)
    return rows @ image @ cols.T


def _axis_matrix(length: int, target: int, method: ResizeMethod) -> torch.Tensor:
    """(target, length) weights taking one axis from ``length`` to ``target`` pixels."""
    scale = length / target
    centres = (torch.arange(target, dtype=torch.float64) + 0.5) * scale
    matrix = torch.zeros(target, length, dtype=torch.float64)
    outputs = torch.arange(target)
    if method == "nearest":
        matrix[outputs, centres.floor().long().clamp(max=length - 1)] = 1.0
        return matrix
    source = (centres - 0.5).clamp(0, length - 1)
    low = source.floor().long()
    high = (low + 1).clamp(max=length - 1)
    fraction = source - low
    matrix.index_put_((outputs, low), 1 - fraction, accumulate=True)
    matrix.index_put_((outputs, high), fraction, accumulate=True)
    if scale > 1:
        matrix = matrix @ _gaussian_matrix(length, (scale - 1) / 2)
    return matrix


def _gaussian_matrix(length: int, sigma: float) -> torch.Tensor:
    """(length, length) Gaussian blur with mirrored edges (… c b | a b c … | b a …)."""
    radius = min(math.floor(4 * sigma + 0.5), length - 1)
    offsets = torch.arange(-radius, radius + 1)
    taps = torch.exp(-0.5 * (offsets.double() / sigma) ** 2)
    taps = taps / taps.sum()
    positions = torch.arange(length)[:, None] + offsets[None, :]
    positions = positions.abs()  # mirror below 0
    positions = torch.where(positions > length - 1, 2 * (length - 1) - positions, positions)
    matrix = torch.zeros(length, length, dtype=torch.float64)
    rows = torch.arange(length)[:, None].expand_as(positions)
    matrix.index_put_((rows, positions), taps.expand_as(positions), accumulate=True)
    return matrix
