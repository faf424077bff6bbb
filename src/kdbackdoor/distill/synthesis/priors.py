"""Loss terms that make synthetic images look like the teacher's training data.

All images are pixel-space (N, C, H, W) in [0, 1]; every term returns a scalar to minimise.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


@contextmanager
def batchnorm_statistics(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yield a list that every forward pass of ``model`` inside the block extends with one term per
    BatchNorm layer: ‖μ_batch − μ_running‖₂ + ‖σ²_batch − σ²_running‖₂ over the layer's input
    channels (DeepInversion's feature-distribution prior). Sum the list for the loss.

    The running statistics are read, never updated (the model should be in eval mode).
    """
    terms: list[torch.Tensor] = []

    def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _output) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                     + torch.linalg.vector_norm(var - module.running_var))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    try:
        yield terms
    finally:
        for handle in handles:
            handle.remove()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (vertical and horizontal)."""
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()


def centred_l2(x: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the pixels from mid-grey 0.5 (keeps images out of saturation)."""
    return (x - 0.5).pow(2).mean()


def disagreement_where_agreeing(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Negative KL(teacher ‖ student) on the samples both models put in the same class.

    Minimising it pushes synthesis towards images the student does not yet imitate, without
    dragging the teacher away from its own decision (the adversarial term of adaptive
    DeepInversion and CMI).
    """
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    kl = F.kl_div(F.log_softmax(student_logits.float(), 1), F.log_softmax(teacher_logits.float(), 1),
                  reduction="none", log_target=True).sum(1)
    return -(kl * agree).mean()


def balanced_targets(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` class labels, as equal a count of each class as ``n`` allows, in seeded random order."""
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=generator)]
