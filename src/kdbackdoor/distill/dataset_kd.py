"""Distillation on a data set: a student learns from a teacher on real (possibly poisoned) images.

The student trains with the shared loop (augmentation, schedule, resumable state, progress)
and the KD loss of ``kdbackdoor.distill.losses``. When the set carries poisons (its
provenance says so) a *baseline* student can be distilled on the same set without them,
so that the record puts the attack's effect beside what the data alone gives.

With λ = 1 the labels are unused, so the images may come from any other data set with any
classes: that is out-of-distribution (OOD) KD, e.g. GTSRB images for a CIFAR-10 teacher,
optionally with CutMix (``TrainConfig.cutmix``). The student has the teacher's classes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from kdbackdoor.atomic import write_json
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.distill.hooks import DistillDefense, TransferSet
from kdbackdoor.distill.losses import KDConfig, kd_loss, precompute_logits
from kdbackdoor.distill.record import MODEL_FILE, RECORD_FILE, Backdoor, backdoor_record, student_metrics
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models import build_model, load_checkpoint, save_checkpoint
from kdbackdoor.models.compatibility import check_compatible
from kdbackdoor.run_record import environment, file_checksums
from kdbackdoor.numerics import to_layout
from kdbackdoor.runtime import seed_everything
from kdbackdoor.training import TrainConfig, fit

BASELINE_DIR = "baseline"
RUN_FILES = (MODEL_FILE, "model.json", RECORD_FILE)
"""A finished distillation folder's files (its record last)."""


def distill(
    teacher: torch.nn.Module,
    train: ImageDataset,
    test: ImageDataset,
    student_arch: str,
    config: TrainConfig,
    kd: KDConfig,
    out_dir: str | Path,
    *,
    device: torch.device,
    backdoor: Backdoor | None = None,
    baseline: bool = False,
    evaluate_teacher: bool = True,
    resume: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
    defense: DistillDefense | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Distill ``teacher`` into a new ``student_arch`` on ``train``; write the run to ``out_dir``.

    Writes ``model.safetensors`` (+ ``model.json``, whose metadata is the run record) and
    ``metrics.json``: student ACC (and ASR, per-source-class ASR and, for restricted sources,
    the trigger's false-positive rate on the other classes), the teacher's metrics
    (``evaluate_teacher``), and with ``baseline`` the same for a student distilled in
    ``out_dir/baseline`` on ``train`` without its poisoned rows. A ``defense``
    (``kdbackdoor.distill.hooks``) first prepares the transfer set (e.g. the Shuffling Vaccine
    marks rows to push the student away from), then, for each student (the baseline's too),
    chooses the teacher's targets (e.g. robust KD's view averages) and adds gradients to each
    step (e.g. Self-Retrospection). Returns (student, record).
    """
    out_dir = Path(out_dir)
    labels_used = kd.kd_lambda < 1
    if config.cutmix > 0 and labels_used:
        raise KDBackdoorError("CutMix does not mix labels: use it with --kd-lambda 1 (KL only)")
    check_compatible(teacher, train, classes=labels_used)
    check_compatible(teacher, test)
    if train.image_shape != test.image_shape:
        raise KDBackdoorError(f"training images are {train.image_shape} but test images {test.image_shape}")
    started = time.perf_counter()
    transfer = TransferSet(train) if defense is None else defense.prepare_transfer_set(teacher, TransferSet(train),
                                                                                        device)
    student, record = _distill_one(teacher, transfer, test, student_arch, config, kd, out_dir, device=device,
                                   backdoor=backdoor, resume=resume, progress=progress, defense=defense)
    if evaluate_teacher:
        record["teacher_metrics"] = student_metrics(teacher, test, backdoor, device)
    if baseline:
        record["baseline"] = _baseline(teacher, transfer, test, student_arch, config, kd, out_dir / BASELINE_DIR,
                                       device=device, backdoor=backdoor, resume=resume, progress=progress,
                                       defense=defense)
    record.update(wall_seconds_this_run=time.perf_counter() - started, device=str(device),
                  environment=environment(device, config.seed), **(metadata or {}))
    _save_run(student, record, out_dir, test.classes,
              [f"{BASELINE_DIR}/{name}" for name in RUN_FILES] if baseline else [])
    return student, record


def _save_run(student, record: dict, out_dir: Path, classes: list[str], extra_files: list[str]) -> None:
    """Checkpoint, then the record with the checksums of the run's files, written last."""
    save_checkpoint(student, out_dir / MODEL_FILE, classes=classes, metadata=record)
    record["files"] = file_checksums(out_dir, [*RUN_FILES[:2], *extra_files])
    write_json(out_dir / RECORD_FILE, record)


def _distill_one(teacher, transfer: TransferSet, test, student_arch, config, kd, out_dir, *, device, backdoor,
                 resume, progress, defense: DistillDefense | None = None):
    train = transfer.data
    seed_everything(config.seed)
    c, h, w = train.image_shape
    student = build_model(student_arch, num_classes=test.num_classes, in_channels=c, input_size=(h, w)).to(device)
    teacher = to_layout(teacher.to(device)).eval()
    augmented = config.crop_padding > 0 or config.hflip or config.cutmix > 0
    # without augmentation every row always looks the same: the teacher runs once per row, not per epoch
    once_per_row = not augmented and kd.kd_lambda != 0
    if defense is not None:
        defense.setup(teacher, student, device)
    targets = teacher if defense is None else defense.teacher_targets(teacher, once_per_row)
    cached = precompute_logits(targets, train.images.to(device)) if once_per_row else None
    loss_fn = kd_loss(targets, kd, cached, push_away=transfer.push_away, push_weight=transfer.push_weight)
    history = fit(student, train, config, out_dir, loss_fn=loss_fn, test=test, device=device,
                  resume=resume, progress=progress, description=f"distill {student_arch}", step_hook=defense,
                  trigger=backdoor.trigger if backdoor else None, target=backdoor.target if backdoor else None)
    poisoned = int(train.provenance.poisoned.sum()) if train.provenance is not None else 0
    record = {
        "student_arch": student_arch,
        "train": {"name": train.name, "size": len(train), "poisoned": poisoned},
        "test": {"name": test.name, "size": len(test)},
        "config": config.model_dump(),
        "kd": kd.model_dump(),
        "teacher_logits_cached": cached is not None,
        "defense": defense.record() if defense is not None else None,
        "backdoor": backdoor_record(backdoor),
        "metrics": student_metrics(student, test, backdoor, device),
        "history": history,
    }
    return student, record


def _baseline(teacher, transfer: TransferSet, test, student_arch, config, kd, out_dir, *, device, backdoor, resume,
              progress, defense=None):
    """The same distillation without the poisoned rows (reused when a finished one is there)."""
    train = transfer.data
    if train.provenance is None or not train.provenance.poisoned.any():
        raise KDBackdoorError("a baseline needs a poisoned training set (its provenance marks no poison)")
    record_path = out_dir / RECORD_FILE
    if resume and record_path.is_file() and (out_dir / MODEL_FILE).is_file():
        load_checkpoint(out_dir / MODEL_FILE)  # proves the finished baseline is intact
        return json.loads(record_path.read_text())
    keep = ~train.provenance.poisoned
    clean = TransferSet(train.subset(keep, name=f"{train.name}-without-poisons"),  # the marks follow their rows
                        None if transfer.push_away is None else transfer.push_away[keep], transfer.push_weight)
    student, record = _distill_one(teacher, clean, test, student_arch, config, kd, out_dir, device=device,
                                   backdoor=backdoor, resume=resume, progress=progress, defense=defense)
    _save_run(student, record, out_dir, test.classes, [])
    return record


