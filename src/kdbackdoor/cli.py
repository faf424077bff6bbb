"""The ``kdbackdoor`` command line. Each command is a thin layer over the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kdbackdoor.attacks.teacher_poisoning import RATE_HELP
from kdbackdoor.errors import KDBackdoorError

app = typer.Typer(
    help="Attack, defend and audit knowledge distillation against backdoors.\n\n"
    "Images are pixel-space [0,1] tensors; data sets are loaded once into memory as uint8.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # errors stay on one line

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
    backdoor: Optional[str] = typer.Option(None, help="trigger spec to plant (see `kdbackdoor triggers list`); "
                                           "none trains a clean teacher"),
    target: int = typer.Option(0, help="backdoor target class (all-to-one)"),
    poison_rate: float = typer.Option(0.1, help=RATE_HELP),
    poison_mode: str = typer.Option("replace", help="replace | add (see --poison-rate)"),
    poison_style: str = typer.Option("auto", help="dirty (relabel non-target images) | clean (poison target-class "
                                     "images, labels kept) | auto (clean for sig and clean-label)"),
    adv_model: Optional[Path] = typer.Option(None, help="clean model for the clean-label trigger's PGD step"),
    adv_eps: float = typer.Option(16 / 255, help="clean-label PGD radius, L∞ in pixel units"),
    holdout: float = typer.Option(0.0, help="share of the training set reserved as clean holdout (not trained on)"),
) -> None:
    """Train a teacher, clean or backdoored; weights as safetensors with a JSON sidecar.

    With --backdoor, a seeded draw of images gets the trigger (all-to-one) before training;
    the trigger's full definition, the rate and its meaning go into the sidecar, and every
    training sample's provenance into provenance.npz.
    """
    from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
    from kdbackdoor.runtime import select_device
    from kdbackdoor.teacher import train_teacher
    from kdbackdoor.training import TrainConfig

    config = _validated(TrainConfig, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        schedule=schedule, label_smoothing=label_smoothing, crop_padding=crop_padding,
                        hflip=hflip, eval_every=eval_every, seed=seed)
    poison = _validated(PoisonConfig, target=target, rate=poison_rate, mode=poison_mode, style=poison_style,
                        adv_eps=adv_eps, seed=seed)
    dev = select_device(device)
    train = _load(dataset, "train", data_dir, resize, progress)
    test = _load(dataset, "test", data_dir, resize, progress)
    trigger = _trigger(backdoor, train.image_shape, seed) if backdoor else None
    adversary = _load_model(adv_model, dev, train) if adv_model else None
    _, record = train_teacher(train, test, arch, config, out, device=dev, resume=resume, progress=progress,
                              metadata={"dataset": dataset_record(dataset, data_dir, resize)},
                              trigger=trigger, poison=poison if trigger else None, holdout=holdout,
                              adversary=adversary)
    metrics = record["metrics"]
    asr = f", ASR {metrics['asr']:.2%}" if "asr" in metrics else ""
    console.print(f"test accuracy {metrics['acc']:.2%}{asr}  →  {out / 'model.safetensors'}")


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
    trigger: Optional[str] = typer.Option(None, help="trigger spec for ASR (default: the checkpoint's backdoor, if any)"),
    target: Optional[int] = typer.Option(None, help="ASR target class (default: the checkpoint's)"),
) -> None:
    """ACC overall and per class, and ASR with per-source-class ASR when a trigger is known.

    ASR = share of test images whose true label differs from the target that the model
    assigns to the target once the trigger is applied.
    """
    from kdbackdoor.atomic import write_json
    from kdbackdoor.evaluate import accuracy, attack_success_rate
    from kdbackdoor.models import load_checkpoint
    from kdbackdoor.runtime import select_device
    from kdbackdoor.triggers import build_trigger

    dev = select_device(device)
    net, sidecar = load_checkpoint(model, device=dev)
    meta = sidecar.get("metadata") or {}
    recorded = meta.get("dataset") or {}
    if dataset is None:
        if not recorded.get("spec"):
            raise KDBackdoorError(f"{model}: the checkpoint records no data set; pass --dataset")
        dataset = recorded["spec"]
        data_dir = data_dir or (Path(recorded["data_dir"]) if recorded.get("data_dir") else None)
        resize = resize or recorded.get("resize")
    data = _load(dataset, split, data_dir, resize)
    result = {"model": str(model), "dataset": dataset, "split": split,
              **accuracy(net, data, device=dev, batch_size=batch_size)}
    backdoor = meta.get("backdoor") or {}
    trig = _trigger(trigger, data.image_shape, 0) if trigger else (
        build_trigger(backdoor["trigger"]) if backdoor.get("trigger") else None)
    target = target if target is not None else backdoor.get("target")
    if trig is not None:
        if target is None:
            raise KDBackdoorError("--trigger given without --target (the checkpoint records no target)")
        asr = attack_success_rate(net, data, trig, target, device=dev, batch_size=batch_size)
        result["backdoor"] = {"trigger": trig.config(), "target": target, "asr": asr["asr"],
                              "per_source_class_asr": asr["per_source_class"], "n": asr["n"]}
    out = out or _model_dir(model) / "evaluation.json"
    write_json(out, result)
    console.print(_evaluation_table(result, f"{model} on {dataset}:{split}"))
    console.print(f"written to {out}")


triggers_app = typer.Typer(help="The trigger library: list triggers, render them on images.", no_args_is_help=True)
app.add_typer(triggers_app, name="triggers")


@triggers_app.command("list")
def triggers_list_cmd() -> None:
    """Every trigger with its parameters and defaults, and the spec syntax."""
    from kdbackdoor.triggers import describe_syntax
    console.print(describe_syntax(), highlight=False, soft_wrap=True)


@triggers_app.command("show")
def triggers_show_cmd(
    specs: list[str] = typer.Argument(..., help="one or more trigger specs, e.g. badnets-square blend:alpha=0.1"),
    dataset: str = typer.Option("digits", help=DATASET_HELP),
    split: str = typer.Option("test"),
    data_dir: Optional[Path] = typer.Option(None),
    resize: Optional[int] = typer.Option(None),
    count: int = typer.Option(8, min=1, help="images per grid"),
    seed: int = typer.Option(0, help="trigger seed (random patterns) and image draw"),
    out: Path = typer.Option(Path("triggers"), help="folder for the PNG grids (one per trigger)"),
) -> None:
    """Write PNG grids: clean images, triggered images, and their difference (amplified)."""
    import torch
    from kdbackdoor.triggers import render_trigger_grid

    data = _load(dataset, split, data_dir, resize)
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    images = data.pixels(rows)
    for spec in specs:
        trig = _trigger(spec, data.image_shape, seed)
        safe = "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in spec)[:80]
        path = render_trigger_grid(trig, images, out / f"{safe}.png", max_images=count)
        console.print(f"{trig.describe()}  →  {path}")


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


def _evaluation_table(result: dict, title: str) -> Table:
    backdoor = result.get("backdoor")
    table = Table(title=title)
    for column in ["class", "ACC"] + (["ASR (as source)"] if backdoor else []):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, acc in result["per_class"].items():
        cells = [name, f"{acc:.2%}"]
        if backdoor:
            per_source = backdoor["per_source_class_asr"]
            cells.append(f"{per_source[name]:.2%}" if name in per_source else "(target)")
        table.add_row(*cells)
    table.add_row("[bold]all", f"[bold]{result['acc']:.2%}", *([f"[bold]{backdoor['asr']:.2%}"] if backdoor else []))
    return table


def _trigger(spec: str, image_shape: tuple[int, int, int], seed: int):
    from kdbackdoor.triggers import build_trigger
    return build_trigger(spec, image_shape=image_shape, seed=seed)


def _load_model(path: Path, device, data):
    from kdbackdoor.evaluate import check_compatible
    from kdbackdoor.models import load_checkpoint
    model, _ = load_checkpoint(path, device=device)
    check_compatible(model, data)
    return model


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
