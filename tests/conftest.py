"""Shared fixtures: the real data beside the checkout, and small in-memory data sets."""

from __future__ import annotations

import importlib
import os
import pickletools
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from kdbackdoor.data.dataset import ImageDataset

# Tests run tiny models, which gain nothing from a second thread; one thread per process (this
# one and the workers and subprocesses tests start) avoids OpenMP oversubscription on the 2-core
# CI machines, where it made single ops 10-40x slower.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def import_benchmark():
    """Imports a module of benchmarks/ (scripts that import their sibling `common`, not a package)."""
    def load(name: str):
        sys.path.insert(0, str(BENCHMARKS))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCHMARKS))
    return load


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout; tests that need it skip when it is absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def digits():
    """The embedded digits data set, (train, test)."""
    from kdbackdoor.data.sources import load_dataset
    return load_dataset("digits", "train", progress=False), load_dataset("digits", "test", progress=False)


def encoded_label_dataset(n_per_class: int = 5, num_classes: int = 4, size: int = 6) -> ImageDataset:
    """Images whose top-left pixel encodes the label (value 40·label): trivial to classify by rule."""
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    images = torch.zeros(len(labels), 1, size, size, dtype=torch.uint8)
    images[:, 0, 0, 0] = (labels * 40).to(torch.uint8)
    return ImageDataset(images, labels, [f"c{i}" for i in range(num_classes)], name="encoded")


class PixelRuleModel(torch.nn.Module):
    """Predicts round(top-left pixel · 255 / 40): perfect on ``encoded_label_dataset``."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = 1
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 255 / 40).round().long().clamp(0, self.num_classes - 1)
        return torch.nn.functional.one_hot(label, self.num_classes).float() + 0 * self.dummy


@pytest.fixture(scope="session")
def digits_teacher(digits, tmp_path_factory):
    """A clean small-cnn digits teacher (about 95% test ACC), trained once per test run; eval mode."""
    from kdbackdoor.models import build_model
    from kdbackdoor.runtime import seed_everything
    from kdbackdoor.training import TrainConfig, cross_entropy_loss, fit
    train, _ = digits
    seed_everything(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8))
    config = TrainConfig(epochs=8, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0)
    fit(model, train, config, tmp_path_factory.mktemp("digits-teacher"), loss_fn=cross_entropy_loss(),
        progress=False)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


@pytest.fixture(scope="session")
def backdoored_digits_teacher(digits, tmp_path_factory):
    """A small-cnn digits teacher with a badnets-grid backdoor (target 0, 10% poisons); eval mode.

    Returns (model, trigger, record); the record holds its ACC and ASR.
    """
    from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
    from kdbackdoor.runtime import seed_everything
    from kdbackdoor.teacher import train_teacher
    from kdbackdoor.training import TrainConfig
    from kdbackdoor.triggers import build_trigger
    train, test = digits
    trigger = build_trigger("badnets-grid", image_shape=train.image_shape)
    seed_everything(0)
    config = TrainConfig(epochs=8, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0)
    model, record = train_teacher(train, test, "small-cnn", config, tmp_path_factory.mktemp("backdoored-teacher"),
                                  device=torch.device("cpu"), progress=False, trigger=trigger,
                                  poison=PoisonConfig(target=0, rate=0.1, seed=0))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval(), trigger, record


class CreatesFileWhenUnpickled:
    """Unpickling this object creates the file at ``marker``: what a hostile checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickle_calls_open_on(path: Path, marker: Path) -> bool:
    """Whether the pickle in ``path`` (a ``torch.save`` archive or a plain pickle) calls ``open``
    on ``marker`` when loaded, found by reading its opcodes, never by running them."""
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    opcodes = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    names_open = any((name == "GLOBAL" and str(arg).endswith(" open")) or arg == "open" for name, arg in opcodes)
    return names_open and any(name == "REDUCE" for name, _ in opcodes) and any(arg == str(marker) for _, arg in opcodes)


@pytest.fixture(scope="session")
def tiny_cifar10(shared_dir, tmp_path_factory) -> str:
    """``imagefolder:PATH`` spec of a tiny real CIFAR-10: the first 20 train and 10 test JPEGs of
    each class of ``../shared/data/cifar10-jpeg``, copied to a temporary folder."""
    import shutil
    root = tmp_path_factory.mktemp("tiny-cifar10")
    for split, count in (("train", 20), ("test", 10)):
        for class_dir in sorted((shared_dir / "data" / "cifar10-jpeg" / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, target / image.name)
    return f"imagefolder:{root}"
