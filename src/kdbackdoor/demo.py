"""The end-to-end demo on the embedded digits data: no download, about a minute on a CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kdbackdoor.atomic import write_json
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.evaluate import accuracy
from kdbackdoor.models import load_checkpoint
from kdbackdoor.teacher import MODEL_FILE, train_teacher
from kdbackdoor.training import TrainConfig

DEMO_MARKER = "demo.json"
TEACHER = TrainConfig(epochs=20, batch_size=64, lr=0.05, crop_padding=1, hflip=False, eval_every=5, seed=0)


def run_demo(out: str | Path, *, device: torch.device, progress: bool = True, console: Console | None = None) -> dict:
    """Train a teacher on digits, evaluate it, save it, reload it safely and check it.

    Writes ``out/teacher/`` (checkpoint, metrics) and ``out/demo.json`` (summary).
    """
    console = console or Console()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            from kdbackdoor.errors import KDBackdoorError
            raise KDBackdoorError(f"{out} is not empty and holds no earlier demo; choose another --out")
        shutil.rmtree(out)
    train = load_dataset("digits", "train", progress=progress)
    test = load_dataset("digits", "test", progress=progress)
    console.print(f"[bold]digits[/]: {len(train)} train / {len(test)} test images, "
                  f"{train.image_shape[0]}x{train.image_shape[1]}x{train.image_shape[2]}, {train.num_classes} classes")

    teacher_dir = out / "teacher"
    _, record = train_teacher(train, test, "small-cnn", TEACHER, teacher_dir, device=device, progress=progress,
                              metadata={"dataset": {"spec": "digits", "data_dir": None, "resize": None}})
    reloaded, _ = load_checkpoint(teacher_dir / MODEL_FILE, device=device)
    reloaded_acc = accuracy(reloaded, test, device=device)["acc"]

    summary = {
        "teacher": {"arch": "small-cnn", "acc": record["metrics"]["acc"], "acc_after_reload": reloaded_acc,
                    "checkpoint": str(teacher_dir / MODEL_FILE)},
    }
    table = Table(title="kdbackdoor demo (digits)")
    table.add_column("model")
    table.add_column("ACC", justify="right")
    table.add_row("clean teacher (small-cnn)", f"{summary['teacher']['acc']:.1%}")
    table.add_row("same, reloaded from safetensors", f"{reloaded_acc:.1%}")
    console.print(table)
    write_json(out / DEMO_MARKER, summary)
    console.print(f"results in {out}/ (summary: {out / DEMO_MARKER})")
    return summary
