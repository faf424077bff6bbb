"""The ``kdbackdoor`` command line. Each command is a thin layer over the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kdbackdoor.errors import KDBackdoorError

app = typer.Typer(
    help="Attack, defend and audit knowledge distillation against backdoors.\n\n"
    "Images are pixel-space [0,1] tensors; data sets are loaded once into memory as uint8.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

DATASET_HELP = ("data set: digits (embedded, no download), cifar10, cifar100 (downloaded with checksum "
                "or read from --data-dir), gtsrb (official layout in --data-dir), imagefolder:PATH, npz:PATH")
DEVICE_HELP = "auto (CUDA when present), cpu, cuda, cuda:N"


def _load(spec: str, split: str, data_dir: Optional[Path], resize: Optional[int], progress: bool = True):
    from kdbackdoor.data.sources import load_dataset
    return load_dataset(spec, split, data_dir=data_dir, resize=resize, progress=progress)


def dataset_record(spec: str, data_dir: Optional[Path], resize: Optional[int]) -> dict:
    """How to load the data set again (stored in checkpoints so `evaluate` can default to it)."""
    return {"spec": spec, "data_dir": str(data_dir) if data_dir else None, "resize": resize}


@app.command("train-teacher")
def train_teacher_cmd(
    dataset: str = typer.Option("digits", help=DATASET_HELP),
    arch: str = typer.Option("small-cnn", help="architecture (see `kdbackdoor models`)"),
    out: Path = typer.Option(..., help="output folder: model.safetensors + model.json, metrics.json, train_state.pt"),
    epochs: int = typer.Option(30, min=1),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(0.1, help="peak learning rate (SGD, Nesterov momentum 0.9)"),
    weight_decay: float = typer.Option(5e-4),
    schedule: str = typer.Option("onecycle", help="onecycle (linear warm-up then decay) | cosine | step | constant"),
    label_smoothing: float = typer.Option(0.0),
    crop_padding: int = typer.Option(4, help="random-crop padding in px (0 disables)"),
    hflip: bool = typer.Option(True, help="random horizontal flips"),
    eval_every: int = typer.Option(1, help="test accuracy every N epochs (0: at the end only)"),
    seed: int = typer.Option(0),
    data_dir: Optional[Path] = typer.Option(None, help="where cifar/gtsrb files are (else the cache/download)"),
    resize: Optional[int] = typer.Option(None, help="resize images to this many px (square)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resume: bool = typer.Option(False, help="continue an interrupted run in --out"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Train a (clean) teacher; weights as safetensors with a JSON sidecar."""
    from kdbackdoor.runtime import select_device
    from kdbackdoor.teacher import train_teacher
    from kdbackdoor.training import TrainConfig

    config = _validated(TrainConfig, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        schedule=schedule, label_smoothing=label_smoothing, crop_padding=crop_padding,
                        hflip=hflip, eval_every=eval_every, seed=seed)
    dev = select_device(device)
    train = _load(dataset, "train", data_dir, resize, progress)
    test = _load(dataset, "test", data_dir, resize, progress)
    _, record = train_teacher(train, test, arch, config, out, device=dev, resume=resume, progress=progress,
                              metadata={"dataset": dataset_record(dataset, data_dir, resize)})
    console.print(f"test accuracy {record['metrics']['acc']:.2%}  →  {out / 'model.safetensors'}")


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Option(..., help="checkpoint: .safetensors (+ .json sidecar), its folder, or a .pt state dict"),
    dataset: Optional[str] = typer.Option(None, help=DATASET_HELP + " (default: the checkpoint's data set)"),
    split: str = typer.Option("test"),
    data_dir: Optional[Path] = typer.Option(None),
    resize: Optional[int] = typer.Option(None),
    out: Optional[Path] = typer.Option(None, help="JSON file for the results (default: evaluation.json beside the model)"),
    batch_size: int = typer.Option(512, min=1),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Top-1 accuracy, overall and per class, printed and written as JSON."""
    from kdbackdoor.atomic import write_json
    from kdbackdoor.evaluate import accuracy
    from kdbackdoor.models import load_checkpoint
    from kdbackdoor.runtime import select_device

    dev = select_device(device)
    net, sidecar = load_checkpoint(model, device=dev)
    recorded = (sidecar.get("metadata") or {}).get("dataset") or {}
    if dataset is None:
        if not recorded.get("spec"):
            raise KDBackdoorError(f"{model}: the checkpoint records no data set; pass --dataset")
        dataset = recorded["spec"]
        data_dir = data_dir or (Path(recorded["data_dir"]) if recorded.get("data_dir") else None)
        resize = resize or recorded.get("resize")
    data = _load(dataset, split, data_dir, resize)
    result = {"model": str(model), "dataset": dataset, "split": split,
              **accuracy(net, data, device=dev, batch_size=batch_size)}
    out = out or _model_dir(model) / "evaluation.json"
    write_json(out, result)
    table = Table(title=f"{model} on {dataset}:{split}")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in result["per_class"].items():
        table.add_row(name, f"{acc:.2%}")
    table.add_row("[bold]all", f"[bold]{result['acc']:.2%}")
    console.print(table)
    console.print(f"written to {out}")


@app.command("datasets")
def datasets_cmd() -> None:
    """List the data-set sources."""
    from kdbackdoor.data.sources import available_datasets
    for name in available_datasets():
        console.print(name)


@app.command("models")
def models_cmd() -> None:
    """List the architectures."""
    from kdbackdoor.models import available_architectures
    for name in available_architectures():
        console.print(name)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="output folder (replaced if it holds an earlier demo)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    progress: bool = typer.Option(True),
) -> None:
    """End-to-end run on the embedded digits data (no download, about a minute on a laptop CPU)."""
    from kdbackdoor.demo import run_demo
    from kdbackdoor.runtime import select_device
    run_demo(out, device=select_device(device), progress=progress, console=console)


def _model_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _validated(model_cls, **values):
    from pydantic import ValidationError
    try:
        return model_cls(**values)
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise KDBackdoorError(f"invalid option: {problems}") from None


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except KDBackdoorError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except OSError as exc:  # unwritable output, disk full, missing file outside our checks
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun with --resume to continue where the last epoch ended")
        sys.exit(130)


if __name__ == "__main__":
    main()
