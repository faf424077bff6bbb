"""The one place where experiments call into distillation (dataset, OOD and data-free KD).

``check_available`` says, before any work starts, whether this installation can run the
configured method and its settings; ``distill_student`` runs it. Defenses are built by name
from the registry (``kdbackdoor.distill.hooks.DEFENSES``), so a new defense needs no wiring here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.distill.hooks import DEFENSES, DistillDefense, build_defense
from kdbackdoor.distill.record import Backdoor
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.config import DATA_FREE_METHODS, ExperimentConfig


def check_available(config: ExperimentConfig) -> None:
    """Raise ``KDBackdoorError`` if the method or its parameters cannot run here (the config has
    checked the defense against the registry already)."""
    if config.distill.method in DATA_FREE_METHODS:
        _data_free_config(config)


def _data_free_config(config: ExperimentConfig):
    from kdbackdoor.distill.data_free import METHODS, DataFreeConfig
    method = config.distill.method
    if method not in METHODS:
        raise KDBackdoorError(f"distill.method: {method!r} is not available in this installation "
                              f"(data-free: {', '.join(METHODS)})")
    params = {"save_samples": True, **config.distill.data_free}
    try:
        return DataFreeConfig(method=method, seed=config.stage_seed("distill"), **params)
    except ValidationError as exc:
        problems = "; ".join(f"distill.data_free.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise KDBackdoorError(problems) from None


def distill_student(
    config: ExperimentConfig,
    teacher: torch.nn.Module,
    transfer: ImageDataset | None,
    test: ImageDataset,
    out_dir: Path,
    *,
    device: torch.device,
    backdoor: Backdoor | None,
    progress: bool,
    metadata: dict,
) -> dict:
    """Distill ``teacher`` as ``config.distill`` says into ``out_dir``; return the run record.

    ``transfer`` is the distillation set (None for data-free methods). An interrupted run in
    ``out_dir`` is continued. The record is the library's (``metrics``, ``teacher_metrics``,
    ``baseline``, ``history``, ...), also written to ``out_dir/metrics.json``.
    """
    section = config.distill
    seed = config.stage_seed("distill")
    common = dict(device=device, backdoor=backdoor, evaluate_teacher=config.evaluation.evaluate_teacher,
                  resume=True, progress=progress, metadata=metadata, defense=build_experiment_defense(config))
    if section.method in DATA_FREE_METHODS:
        from kdbackdoor.distill.data_free import distill_data_free
        student, record = distill_data_free(teacher, test, section.student_arch, _data_free_config(config), out_dir,
                                            **common)
        return _purified(config, student, record, test, out_dir, device, backdoor, progress)
    from kdbackdoor.distill.dataset_kd import distill
    train_config = section.train.model_copy(update={"seed": seed})
    student, record = distill(teacher, transfer, test, section.student_arch, train_config, section.kd, out_dir,
                              baseline=section.baseline, **common)
    return _purified(config, student, record, test, out_dir, device, backdoor, progress)


def _purified(config: ExperimentConfig, student: torch.nn.Module, record: dict, test: ImageDataset, out_dir: Path,
              device: torch.device, backdoor: Backdoor | None, progress: bool) -> dict:
    """With defense nad: the distilled student purified by NAD on ``nad.clean_size`` images of the data
    set's train split (the defender's clean set); the record's metrics become the purified
    student's, the distilled one's stay as ``metrics_before_defense``. Else ``record`` unchanged."""
    if not DEFENSES[config.distill.defense].after_distillation:
        return record
    from kdbackdoor.atomic import write_json
    from kdbackdoor.data.sources import load_dataset
    from kdbackdoor.defenses.nad import NADConfig, nad_purify
    from kdbackdoor.distill.record import RECORD_FILE, student_metrics
    from kdbackdoor.models import save_checkpoint

    folder = out_dir / "nad"
    done = folder / RECORD_FILE
    if done.is_file():
        return json.loads(done.read_text())
    nad = (config.distill.nad or NADConfig()).model_copy(update={"seed": config.stage_seed("distill")})
    data = config.data
    clean = load_dataset(data.dataset, "train", data_dir=data.data_dir, resize=data.resize, progress=progress)
    purified, nad_record = nad_purify(student, clean, nad, folder, device=device, progress=progress, resume=True)
    record = {**record, "metrics_before_defense": record["metrics"], "defense": nad_record,
              "metrics": student_metrics(purified, test, backdoor, device)}
    save_checkpoint(purified, folder / "model.safetensors", classes=test.classes, metadata=record)
    write_json(done, record)
    return record


def build_experiment_defense(config: ExperimentConfig) -> DistillDefense | None:
    """``config.distill.defense`` built from the registry with its settings sections (their
    defaults where the config has none), each seeded with the distillation's seed."""
    section = config.distill
    seeded = {"seed": config.stage_seed("distill")}
    settings = {key: (getattr(section, key, None) or default()).model_copy(update=seeded)
                for key, default in DEFENSES[section.defense].settings.items()}
    return build_defense(section.defense, section.method, **settings)
