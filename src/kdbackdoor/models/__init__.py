"""Models: pixel-space classifiers, the architecture registry and safe checkpoint I/O."""

# Importing the architecture modules registers them.
from kdbackdoor.models import (  # noqa: F401
    fast_cnn, imagenet_resnet, imagenet_vgg, mobilenet_v2, resnet, small_cnn, vgg, wrn,
)
from kdbackdoor.models.checkpoint import load_checkpoint, save_checkpoint
from kdbackdoor.models.classifier import Classifier
from kdbackdoor.models.compatibility import check_compatible
from kdbackdoor.models.registry import available_architectures, build_model

__all__ = [
    "Classifier",
    "available_architectures",
    "build_model",
    "check_compatible",
    "load_checkpoint",
    "save_checkpoint",
]
