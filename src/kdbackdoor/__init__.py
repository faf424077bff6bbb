"""kdbackdoor: attack, defend and audit knowledge distillation against backdoors.

Conventions (see docs/conventions.md): images outside a model are float tensors in pixel
space [0, 1], shape (N, C, H, W); storage is uint8; normalisation lives inside the model.
"""

__version__ = "0.1.0"
