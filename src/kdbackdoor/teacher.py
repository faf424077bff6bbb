"""Teacher training: build a model for a data set, train it, evaluate it, save a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kdbackdoor.atomic import write_json
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.evaluate import accuracy
from kdbackdoor.models import build_model, save_checkpoint
from kdbackdoor.runtime import seed_everything
from kdbackdoor.training import TrainConfig, cross_entropy_loss, fit

MODEL_FILE = "model.safetensors"


def train_teacher(
    train: ImageDataset,
    test: ImageDataset,
    arch: str,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train ``arch`` on ``train`` and write ``out_dir/model.safetensors`` (+ ``model.json``).

    ``metadata`` (data set description, poisoning plan, ...) is stored in the checkpoint's
    sidecar. Returns the trained model and the run record also written to ``metrics.json``.
    """
    out_dir = Path(out_dir)
    seed_everything(config.seed)
    c, h, w = train.image_shape
    model = build_model(arch, num_classes=train.num_classes, in_channels=c, input_size=(h, w)).to(device)
    started = time.perf_counter()
    history = fit(model, train, config, out_dir, loss_fn=cross_entropy_loss(config.label_smoothing),
                  test=test, device=device, resume=resume, progress=progress, description=f"train {arch}")
    test_metrics = accuracy(model, test, device=device)
    record = {
        "arch": arch,
        "train": {"name": train.name, "size": len(train)},
        "test": {"name": test.name, "size": len(test)},
        "config": config.model_dump(),
        "metrics": {"acc": test_metrics["acc"], "per_class_acc": test_metrics["per_class"]},
        "history": history,
        "wall_seconds_this_session": time.perf_counter() - started,
        "device": str(device),
        **(metadata or {}),
    }
    save_checkpoint(model, out_dir / MODEL_FILE, classes=train.classes, metadata=record)
    write_json(out_dir / "metrics.json", record)
    return model, record
