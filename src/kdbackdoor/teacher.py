"""Teacher training: build a model for a data set, train it (optionally on a poisoned set),
evaluate it (ACC, and ASR for a backdoor), save a checkpoint with everything needed to
rebuild its trigger."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from kdbackdoor.atomic import atomic_path, write_json
from kdbackdoor.attacks.adba import ADBAConfig, adba_attack
from kdbackdoor.attacks.backweak import BackWeakConfig, backweak_attack
from kdbackdoor.attacks.teacher_poisoning import RATE_HELP, PoisonConfig, holdout_split, poison_training_set
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.evaluate import check_same_classes, model_metrics
from kdbackdoor.models import build_model, save_checkpoint
from kdbackdoor.run_record import environment, file_checksums
from kdbackdoor.runtime import seed_everything
from kdbackdoor.training import TrainConfig, cross_entropy_loss, fit
from kdbackdoor.triggers import Trigger

MODEL_FILE = "model.safetensors"
PROVENANCE_FILE = "provenance.npz"


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
    trigger: Trigger | None = None,
    poison: PoisonConfig | None = None,
    holdout: float = 0.0,
    adversary: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train ``arch`` on ``train`` and write ``out_dir/model.safetensors`` (+ ``model.json``).

    With ``trigger`` and ``poison`` the training set is poisoned first (see
    ``kdbackdoor.attacks.teacher_poisoning``) and the teacher's ASR is measured; ``holdout``
    reserves a clean share of the training data, never trained on. The provenance of every
    training sample (poisoned, source row, original label) and the holdout rows are saved in
    ``out_dir/provenance.npz``. ``metadata`` is stored in the checkpoint sidecar. Returns the
    model and the run record (also written to ``metrics.json``, last, with the sha256 of every
    file in ``files``; see ``kdbackdoor.run_record``).
    """
    out_dir = Path(out_dir)
    check_same_classes(train, test)
    train, held = holdout_split(train, holdout, config.seed)
    backdoor = None
    if trigger is not None:
        poison = poison or PoisonConfig()
        train = poison_training_set(train, trigger, poison, adversary=adversary)
        backdoor = {"rate_meaning": RATE_HELP, **train.meta["poison"]}

    seed_everything(config.seed)
    c, h, w = train.image_shape
    model = build_model(arch, num_classes=train.num_classes, in_channels=c, input_size=(h, w)).to(device)
    _save_provenance(out_dir / PROVENANCE_FILE, train, held)  # after every check: a bad input leaves no folder
    started = time.perf_counter()
    history = fit(model, train, config, out_dir, loss_fn=cross_entropy_loss(config.label_smoothing),
                  test=test, device=device, resume=resume, progress=progress, description=f"train {arch}",
                  trigger=trigger if backdoor else None, target=backdoor["target"] if backdoor else None)
    metrics = model_metrics(model, test, trigger=trigger if backdoor else None,
                            target=backdoor["target"] if backdoor else None, device=device)
    record = {
        "arch": arch,
        "train": {"name": train.name, "size": len(train), "holdout": {"share": holdout, "size": len(held)}},
        "test": {"name": test.name, "size": len(test)},
        "config": config.model_dump(),
        "backdoor": backdoor,
        "metrics": metrics,
        "history": history,
        "wall_seconds_this_run": time.perf_counter() - started,
        "device": str(device),
        "environment": environment(device, config.seed),
        **(metadata or {}),
    }
    save_checkpoint(model, out_dir / MODEL_FILE, classes=train.classes, metadata=record)
    record["files"] = file_checksums(out_dir, [MODEL_FILE, "model.json", PROVENANCE_FILE])
    write_json(out_dir / "metrics.json", record)
    return model, record


def train_kd_attack_teacher(
    train: ImageDataset,
    test: ImageDataset,
    arch: str,
    config: TrainConfig,
    out_dir: str | Path,
    attack: ADBAConfig | BackWeakConfig,
    *,
    device: torch.device,
    progress: bool = True,
    metadata: dict | None = None,
) -> tuple[torch.nn.Module, dict]:
    """A teacher backdoored by an attack built to survive distillation, written like
    ``train_teacher``'s (``model.safetensors``, ``metrics.json`` with ``backdoor`` = the
    attack's record, whose ``trigger`` and ``target`` evaluation reads).

    ``ADBAConfig``: teacher, trigger and shadow student trained together (``config`` unused).
    ``BackWeakConfig``: a clean teacher trained with ``config`` in ``out_dir/clean``, then
    fine-tuned on the weak trigger (state in ``out_dir/backweak``).
    """
    out_dir = Path(out_dir)
    check_same_classes(train, test)
    started = time.perf_counter()
    if isinstance(attack, ADBAConfig):
        model, trigger, record = adba_attack(train, arch, attack, out_dir, device=device, progress=progress)
    else:
        clean, _ = train_teacher(train, test, arch, config, out_dir / "clean", device=device, resume=True,
                                 progress=progress)
        model, trigger, record = backweak_attack(clean, train, attack, out_dir / "backweak", device=device,
                                                 progress=progress)
    metrics = model_metrics(model, test, trigger=trigger, target=attack.target, device=device)
    record = {
        "arch": arch, "train": {"name": train.name, "size": len(train)}, "test": {"name": test.name, "size": len(test)},
        "config": config.model_dump(), "backdoor": record, "metrics": metrics,
        "wall_seconds_this_run": time.perf_counter() - started, "device": str(device),
        "environment": environment(device, attack.seed), **(metadata or {}),
    }
    save_checkpoint(model, out_dir / MODEL_FILE, classes=train.classes, metadata=record)
    record["files"] = file_checksums(out_dir, [MODEL_FILE, "model.json"])
    write_json(out_dir / "metrics.json", record)
    return model, record


def _save_provenance(path: Path, train: ImageDataset, held: torch.Tensor) -> None:
    prov = train.provenance
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, poisoned=prov.poisoned.numpy(), source_index=prov.source_index.numpy(),
                     original_label=prov.original_label.numpy(), holdout_index=held.numpy())
