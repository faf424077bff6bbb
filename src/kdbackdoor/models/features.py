"""Intermediate outputs of a model by module name, through forward hooks (the model is untouched)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from kdbackdoor.errors import KDBackdoorError


@contextmanager
def capture(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict that each forward pass inside the block fills with ``{name: output}``.

    Names are module names relative to ``model`` (see ``Classifier.stage_names`` and
    ``feature_name``). Outputs keep their autograd graph. Hooks are removed on exit.
    """
    modules = dict(model.named_modules())
    names = list(names)
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise KDBackdoorError(
            f"unknown module name(s) {unknown}; valid names: {', '.join(n for n in modules if n)}"
        )
    outputs: dict[str, torch.Tensor] = {}

    def store(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            outputs[name] = output

        return hook

    handles = [modules[name].register_forward_hook(store(name)) for name in names]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def forward_with_features(
    model: nn.Module, x: torch.Tensor, names: Iterable[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``model(x)`` and return its output with the outputs of the named submodules."""
    with capture(model, names) as features:
        logits = model(x)
    return logits, features
