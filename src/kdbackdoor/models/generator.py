"""Image generators: latent vectors to pixel-space images, and their safe checkpoints.

``ImageGenerator`` is a small DCGAN-style decoder (linear -> (width, H/4, W/4) -> two
upsample-conv-BN-ReLU blocks -> conv -> output layer) whose output is in pixel units. It
serves the generative poisoning engine and the data-free distillation generators.
Checkpoints are safetensors weights plus a JSON sidecar (format ``kdbackdoor-generator/1``:
latent_dim, image_shape, width, output) and never unpickle anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Sequence

import safetensors.torch
import torch
import torch.nn as nn

from kdbackdoor.atomic import write_bytes, write_json
from kdbackdoor.errors import KDBackdoorError

GENERATOR_FORMAT = "kdbackdoor-generator/1"
GeneratorOutput = Literal["sigmoid", "batchnorm"]


class ImageGenerator(nn.Module):
    """Maps latents (N, latent_dim) to images (N, C, H, W) in pixel units; H and W divisible by 4.

    ``output="sigmoid"``: a sigmoid puts every pixel in [0, 1].
    ``output="batchnorm"``: the last layer is an affine BatchNorm, as in the generators of ZSKT
    and ABD. Its output y is read in a classifier's normalised space, mapped to pixel units
    with ``mean`` and ``std`` (per channel, the teacher's) and clipped: x = clamp(y·std + mean,
    0, 1). Saturated pixels (a black-and-white trigger, say) are then as easy to reach as
    mid-grey ones, where a sigmoid needs ever larger inputs for them. ZSKT and ABD do not clip;
    we do, so that images stay in pixel range like every other image in the toolkit (on digits,
    the clipped version transferred the backdoor at least as well: docs/data-free-kd.md).
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], width: int = 64,
                 output: GeneratorOutput = "sigmoid", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        channels, height, width_px = image_shape
        if latent_dim < 1 or width < 1 or height % 4 or width_px % 4 or height < 4 or width_px < 4:
            raise KDBackdoorError(
                f"generator: need latent_dim >= 1, width >= 1 and image sides divisible by 4, got "
                f"latent_dim={latent_dim}, width={width}, image_shape={tuple(image_shape)}")
        if output not in ("sigmoid", "batchnorm"):
            raise KDBackdoorError(f"generator: output must be sigmoid or batchnorm, got {output!r}")
        self.latent_dim = latent_dim
        self.image_shape = (channels, height, width_px)
        self.width = width
        self.output = output
        self.project = nn.Linear(latent_dim, width * (height // 4) * (width_px // 4))
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            *_upsample_block(width, width), *_upsample_block(width, width // 2 or 1),
            nn.Conv2d(width // 2 or 1, channels, 3, padding=1),
            nn.Sigmoid() if output == "sigmoid" else nn.BatchNorm2d(channels),
        )
        if output == "batchnorm":
            mean, std = mean if mean is not None else [0.0] * channels, std if std is not None else [1.0] * channels
            if len(mean) != channels or len(std) != channels or min(std) <= 0:
                raise KDBackdoorError(f"generator: need {channels} means and {channels} positive stds, got "
                                      f"mean={list(mean)}, std={list(std)}")
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _, height, width_px = self.image_shape
        y = self.body(self.project(z).view(len(z), self.width, height // 4, width_px // 4))
        return y if self.output == "sigmoid" else (y * self.std + self.mean).clamp(0, 1)


def _upsample_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Upsample(scale_factor=2), nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU()]


def save_generator(generator: ImageGenerator, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``path`` (.safetensors) and its sidecar (.json, written last); returns the weights path."""
    path = Path(path).with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    write_bytes(path, safetensors.torch.save(tensors))
    write_json(path.with_suffix(".json"), {
        "format": GENERATOR_FORMAT, "latent_dim": generator.latent_dim,
        "image_shape": list(generator.image_shape), "width": generator.width, "output": generator.output,
        "metadata": metadata or {},
    })
    return path


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImageGenerator:
    """Load a generator saved by ``save_generator`` (the .safetensors or its .json); eval mode."""
    path = Path(path)
    weights, sidecar_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not weights.is_file() or not sidecar_path.is_file():
        raise KDBackdoorError(f"{path}: a generator checkpoint needs {weights.name} and {sidecar_path.name}")
    try:
        sidecar = json.loads(sidecar_path.read_text())
        if sidecar.get("format") != GENERATOR_FORMAT:
            raise KDBackdoorError(f"{sidecar_path}: not a {GENERATOR_FORMAT} sidecar")
        # sidecars written before the output option existed describe sigmoid generators
        generator = ImageGenerator(int(sidecar["latent_dim"]), tuple(sidecar["image_shape"]), int(sidecar["width"]),
                                   output=sidecar.get("output", "sigmoid"))
        generator.load_state_dict(safetensors.torch.load_file(weights))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, safetensors.SafetensorError) as exc:
        raise KDBackdoorError(f"{path}: unreadable generator checkpoint ({exc})") from None
    return generator.to(device).eval()
