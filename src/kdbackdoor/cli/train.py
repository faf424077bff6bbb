"""Train a teacher, clean or backdoored: ``kdbackdoor train-teacher``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kdbackdoor.attacks.teacher_poisoning import RATE_HELP
from kdbackdoor.cli.app import app, console
from kdbackdoor.cli.common import load_data, load_model, make_trigger, seeded_subset, start_run, train_config, validated
from kdbackdoor.cli.options import (BATCH_SIZE, COMPILE, CROP_PADDING, DATASET_HELP, DATA_DIR, DETERMINISTIC, DEVICE,
                                   EPOCHS, EVAL_EVERY, HFLIP, LABEL_SMOOTHING, LR, PROGRESS, RESIZE, RESUME, SCHEDULE,
                                   SEED, WEIGHT_DECAY)
from kdbackdoor.data.sources import dataset_record


@app.command("train-teacher")
def train_teacher_cmd(
    dataset: str = typer.Option("digits", help="data set: " + DATASET_HELP),
    arch: str = typer.Option("small-cnn", help="architecture (see `kdbackdoor models`)"),
    out: Path = typer.Option(..., help="output folder: model.safetensors + model.json, metrics.json, train_state.pt"),
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
    schedule: str = SCHEDULE,
    label_smoothing: float = LABEL_SMOOTHING,
    crop_padding: Optional[int] = CROP_PADDING,
    hflip: Optional[bool] = HFLIP,
    eval_every: int = EVAL_EVERY,
    compile_model: bool = COMPILE,
    seed: int = SEED,
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    device: str = DEVICE,
    resume: bool = RESUME,
    progress: bool = PROGRESS,
    deterministic: bool = DETERMINISTIC,
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
    subset: Optional[int] = typer.Option(None, min=1, help="train on a seeded subset of this many training images "
                                         "(the test split stays whole)"),
) -> None:
    """Train a teacher, clean or backdoored; weights as safetensors with a JSON sidecar.

    With --backdoor, a seeded draw of images gets the trigger (all-to-one) before training;
    the trigger's full definition, the rate and its meaning go into the sidecar, and every
    training sample's provenance into provenance.npz.
    """
    from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
    from kdbackdoor.runtime import select_device
    from kdbackdoor.teacher import train_teacher

    config = train_config(epochs, batch_size, lr, weight_decay, schedule, label_smoothing, crop_padding, hflip,
                          eval_every, seed, compile_model=compile_model, dataset=dataset, resize=resize)
    poison = validated(PoisonConfig, {"rate": "--poison-rate", "mode": "--poison-mode", "style": "--poison-style"},
                       target=target, rate=poison_rate, mode=poison_mode, style=poison_style, adv_eps=adv_eps,
                       seed=seed)
    dev = select_device(device)
    start_run(out, resume, deterministic)
    train = seeded_subset(load_data(dataset, "train", data_dir, resize, progress), subset, seed)
    test = load_data(dataset, "test", data_dir, resize, progress)
    trigger = make_trigger(backdoor, train.image_shape, seed) if backdoor else None
    adversary = load_model(adv_model, dev, train) if adv_model else None
    _, record = train_teacher(train, test, arch, config, out, device=dev, resume=resume, progress=progress,
                              metadata={"dataset": dataset_record(dataset, data_dir, resize),
                                        "train_subset": {"size": subset, "seed": seed} if subset else None},
                              trigger=trigger, poison=poison if trigger else None, holdout=holdout,
                              adversary=adversary)
    metrics = record["metrics"]
    asr = f", ASR {metrics['asr']:.2%}" if "asr" in metrics else ""
    console.print(f"test accuracy {metrics['acc']:.2%}{asr}  →  {out / 'model.safetensors'}")
