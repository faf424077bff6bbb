"""A growing store of synthetic images, kept as uint8 on the device."""

from __future__ import annotations

import torch

from kdbackdoor.data.dataset import to_uint8


class SyntheticPool:
    """Synthetic images (uint8, (N, C, H, W)) the student samples its batches from.

    ``capacity`` bounds the memory: when full, the oldest images are dropped first.
    """

    def __init__(self, image_shape: tuple[int, int, int], capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.images = torch.empty((0, *image_shape), dtype=torch.uint8, device=device)

    def __len__(self) -> int:
        return len(self.images)

    def add(self, images: torch.Tensor) -> None:
        """Store pixel images (float [0, 1]) as uint8, dropping the oldest beyond capacity."""
        self.images = torch.cat([self.images, to_uint8(images.detach()).to(self.images.device)])[-self.capacity:]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` images drawn uniformly with replacement, as float pixels in [0, 1]."""
        rows = torch.randint(len(self.images), (n,), generator=generator)
        return self.images[rows.to(self.images.device)].float() / 255

    def state_dict(self) -> dict:
        return {"images": self.images.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.images = state["images"].to(self.images.device)
