"""In-memory image data set: uint8 storage, float pixel batches on the chosen device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from kdbackdoor.errors import KDBackdoorError


@torch.no_grad()
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixel-space floats [0, 1] to storage uint8 (rounded, clamped)."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


@dataclass
class Provenance:
    """Per-sample ground truth of a (possibly poisoned) data set, for evaluation only.

    Defenses never read it. poisoned: bool (N,); source_index: row of the sample in the data
    set it was drawn from (int64, N); original_label: that row's label (int64, N).
    """

    poisoned: torch.Tensor
    source_index: torch.Tensor
    original_label: torch.Tensor

    @staticmethod
    def clean(labels: torch.Tensor) -> "Provenance":
        """Provenance of an untouched data set: nothing poisoned, rows are their own sources."""
        return Provenance(torch.zeros(len(labels), dtype=torch.bool),
                          torch.arange(len(labels)), labels.clone().cpu())

    def select(self, index: torch.Tensor) -> "Provenance":
        index = index.cpu()
        return Provenance(self.poisoned[index], self.source_index[index], self.original_label[index])

    @staticmethod
    def concat(parts: list["Provenance"]) -> "Provenance":
        return Provenance(*(torch.cat([getattr(p, f) for p in parts])
                            for f in ("poisoned", "source_index", "original_label")))


@dataclass
class ImageDataset:
    """A whole data set held in memory.

    images: uint8 tensor (N, C, H, W), pixel values 0..255.
    labels: int64 tensor (N,), values in [0, len(classes)).
    classes: class names in label order.
    name: where the data came from (e.g. ``cifar10:train``), for records.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    meta: dict = field(default_factory=dict)
    provenance: Provenance | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise KDBackdoorError(
                f"{self.name or 'data set'}: images must be uint8 (N, C, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        self.labels = self.labels.to(torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise KDBackdoorError(
                f"{self.name or 'data set'}: {self.images.shape[0]} images but labels have "
                f"shape {tuple(self.labels.shape)}"
            )
        if self.provenance is not None and len(self.provenance.poisoned) != self.images.shape[0]:
            raise KDBackdoorError(f"{self.name or 'data set'}: provenance does not match the images")
        if len(self) == 0:
            raise KDBackdoorError(f"{self.name or 'data set'}: no images")
        bad = ((self.labels < 0) | (self.labels >= len(self.classes))).nonzero()
        if len(bad):
            row = int(bad[0])
            raise KDBackdoorError(
                f"{self.name or 'data set'}: labels must lie in [0, {len(self.classes) - 1}] "
                f"({len(self.classes)} classes); sample {row} has label {int(self.labels[row])} "
                f"({len(bad)} samples out of range)"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor, name: str | None = None) -> "ImageDataset":
        """A new data set holding the samples at ``index`` (a long tensor or bool mask)."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        return ImageDataset(
            self.images[index], self.labels[index], list(self.classes),
            name if name is not None else self.name, dict(self.meta),
            self.provenance.select(index) if self.provenance is not None else None,
        )

    def to(self, device: torch.device | str) -> "ImageDataset":
        """The same data with its tensors on ``device`` (still uint8)."""
        return ImageDataset(
            self.images.to(device), self.labels.to(device), list(self.classes), self.name,
            dict(self.meta), self.provenance,
        )

    def pixels(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Float pixels in [0, 1] for ``index`` (all when None), on the storage device."""
        x = self.images if index is None else self.images[index]
        return x.float().div_(255.0)

    def batches(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(pixels, labels, index)``: float [0, 1] images (B, C, H, W) on ``device``.

        The data set is moved to ``device`` once by the caller (``to``) for speed; if it
        lives elsewhere each batch is copied. ``index`` gives the rows of each batch.
        """
        device = torch.device(device) if device is not None else self.images.device
        n = len(self)
        order = (
            torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        ).to(self.images.device)
        stop = n - (n % batch_size) if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            x = self.images[idx].to(device, non_blocking=True).float().div_(255.0)
            yield x, self.labels[idx].to(device, non_blocking=True), idx
