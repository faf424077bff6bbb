"""Whether a model fits a data set: channels, image size and class count."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kdbackdoor.errors import KDBackdoorError

if TYPE_CHECKING:
    from kdbackdoor.data.dataset import ImageDataset


def check_compatible(model: torch.nn.Module, data: ImageDataset, *, classes: bool = True) -> None:
    """Fail clearly when a model and a data set disagree on channels, image size (H, W, against
    the model's recorded ``input_size``) or (``classes``) class count."""
    num_classes = getattr(model, "num_classes", None)
    in_channels = getattr(model, "in_channels", None)
    if classes and num_classes is not None and num_classes != data.num_classes:
        raise KDBackdoorError(
            f"model has {num_classes} classes but data set {data.name!r} has {data.num_classes}"
        )
    if in_channels is not None and in_channels != data.image_shape[0]:
        raise KDBackdoorError(
            f"model expects {in_channels}-channel images but data set {data.name!r} has "
            f"{data.image_shape[0]} channels"
        )
    input_size = getattr(model, "input_size", None)
    if input_size is not None and tuple(input_size) != tuple(data.image_shape[1:]):
        height, width = input_size
        raise KDBackdoorError(
            f"model was built for {height}x{width} images but data set {data.name!r} has "
            f"{data.image_shape[1]}x{data.image_shape[2]}; load the data with --resize {height}"
            + ("" if height == width else f" (as {height}x{width})")
        )
