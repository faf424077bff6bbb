"""Cached stages of an experiment: the teacher and the poisoned distillation set.

A stage's output lives in ``CACHE/<kind>/<key>/`` where ``key`` is the hash of exactly the
settings that produce it (``teacher_spec`` / ``poison_spec``), so runs that share a teacher
share one folder, and changing a setting changes only the keys that depend on it. The
first process to need a stage builds it while holding ``CACHE/<kind>/<key>.lock``; the
others wait and then load it. A stage interrupted midway is continued by the next run
(training resumes from its last epoch). ``stage.json`` in each folder shows the settings.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from kdbackdoor.atomic import locked, write_json
from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.experiment.config import ExperimentConfig, content_hash

log = logging.getLogger("kdbackdoor.experiment")

STAGE_FILE = "stage.json"
STAGE_VERSION = 1  # bump when a stage's output changes for the same settings
KEY_LENGTH = 16


@dataclass
class StageInfo:
    """Where a stage's output is and whether this run built it (``cached`` False) or reused it."""

    kind: str
    key: str
    path: str
    cached: bool
    seconds: float

    def record(self) -> dict:
        return asdict(self)


def data_spec(config: ExperimentConfig) -> dict:
    """The data set as the stages see it (test_subset only changes evaluation)."""
    return config.data.model_dump(mode="json", exclude={"test_subset"})


def dataset_record(config: ExperimentConfig) -> dict:
    """The data set as checkpoints record it (so `kdbackdoor evaluate` can reload it)."""
    return {"spec": config.data.dataset, "data_dir": config.data.data_dir, "resize": config.data.resize}


def teacher_spec(config: ExperimentConfig) -> dict:
    """Everything that determines a trained teacher."""
    teacher = {key: value for key, value in config.to_data()["teacher"].items() if key not in ("checkpoint", "seed")}
    return {"stage": "teacher", "version": STAGE_VERSION, "data": data_spec(config),
            "teacher": teacher, "seed": config.stage_seed("teacher")}


def poison_spec(config: ExperimentConfig, teacher_key: str) -> dict:
    """Everything that determines a poisoned distillation set (the teacher by its key)."""
    return {"stage": "poisoned-set", "version": STAGE_VERSION, "teacher": teacher_key,
            "transfer": transfer_spec(config), "poison": config.poison.model_dump(mode="json", exclude={"seed"}),
            "seed": config.stage_seed("poison")}


def transfer_spec(config: ExperimentConfig) -> dict:
    """The distillation set before poisoning: its source, and the seeded subset."""
    return {"dataset": config.distill.data or config.data.dataset, "data_dir": config.data.data_dir,
            "resize": config.data.resize, "subset": config.distill.subset, "seed": transfer_seed(config)}


def transfer_seed(config: ExperimentConfig) -> int:
    """Seed of the transfer subset: the poisoning's (as `poison-distill --subset`), else the student's."""
    return config.stage_seed("poison" if config.poison is not None else "distill")


def stage_key(spec: dict) -> str:
    return content_hash(spec)[:KEY_LENGTH]


def cached_stage(cache: Path, kind: str, spec: dict, is_complete: Callable[[Path], bool],
                 build: Callable[[Path], None]) -> StageInfo:
    """Build ``CACHE/kind/<key>`` with ``build(folder)`` unless ``is_complete(folder)``; one builder at a time."""
    key = stage_key(spec)
    folder = Path(cache) / kind / key
    started = time.perf_counter()
    with locked(folder):
        cached = is_complete(folder)
        if cached:
            log.info("%s %s: reused %s", kind, key, folder)
        else:
            log.info("%s %s: building in %s", kind, key, folder)
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / STAGE_FILE, spec)
            build(folder)
    return StageInfo(kind, key, str(folder), cached, time.perf_counter() - started)


def teacher_stage(config: ExperimentConfig, cache: Path, train: Callable[[], ImageDataset], test: ImageDataset,
                  *, device: torch.device, progress: bool) -> tuple[torch.nn.Module, dict, StageInfo]:
    """The teacher: loaded from ``teacher.checkpoint``, or trained once per ``teacher_spec``.

    ``train`` is called only when a teacher has to be trained. Returns (model in eval mode,
    its record: the checkpoint's metadata, stage info).
    """
    from kdbackdoor.models import load_checkpoint
    from kdbackdoor.teacher import MODEL_FILE, train_kd_attack_teacher, train_teacher

    section = config.teacher
    if section.checkpoint is not None:
        started = time.perf_counter()
        model, sidecar = load_checkpoint(
            section.checkpoint, device=device, arch=section.arch if "arch" in section.model_fields_set else None,
            num_classes=section.num_classes, input_size=tuple(section.input_size) if section.input_size else None,
            mean=section.mean, std=section.std)
        sha256 = sidecar.get("weights_sha256") or (sidecar.get("source") or {}).get("sha256", "")
        info = StageInfo("teacher", "file:" + str(sha256)[:KEY_LENGTH],
                         section.checkpoint, True, time.perf_counter() - started)
        return model.eval(), sidecar.get("metadata") or {}, info

    def build(folder: Path) -> None:
        from kdbackdoor.triggers import build_trigger
        data = train()
        seed = config.stage_seed("teacher")
        backdoor = section.backdoor
        trigger = build_trigger(backdoor.trigger, image_shape=data.image_shape, seed=seed) if backdoor else None
        poison = PoisonConfig(**backdoor.model_dump(exclude={"trigger", "seed"}), seed=seed) if backdoor else None
        if section.adba or section.backweak:
            attack = (section.adba or section.backweak).model_copy(update={"seed": seed})
            train_kd_attack_teacher(data, test, section.arch, section.train.model_copy(update={"seed": seed}), folder,
                                    attack, device=device, progress=progress,
                                    metadata={"dataset": dataset_record(config)})
            return
        adversary = load_checkpoint(section.adv_model, device=device)[0] if section.adv_model else None
        train_teacher(data, test, section.arch, section.train.model_copy(update={"seed": seed}), folder,
                      device=device, resume=True, progress=progress, trigger=trigger, holdout=section.holdout,
                      poison=poison, adversary=adversary, metadata={"dataset": dataset_record(config)})

    info = cached_stage(cache, "teachers", teacher_spec(config),
                        lambda folder: (folder / "metrics.json").is_file() and (folder / MODEL_FILE).is_file(),
                        build)
    model, sidecar = load_checkpoint(Path(info.path) / MODEL_FILE, device=device)
    return model.eval(), json.loads((Path(info.path) / "metrics.json").read_text()), info


def poison_stage(config: ExperimentConfig, cache: Path, teacher: torch.nn.Module, teacher_info: StageInfo,
                 transfer: Callable[[], ImageDataset], *, device: torch.device,
                 progress: bool) -> tuple[ImageDataset, dict, StageInfo]:
    """The poisoned distillation set, crafted once per ``poison_spec`` against ``teacher``.

    Writes ``poisoned.npz``, ``manifest.json`` and ``poisons.png`` (clean sources, poisons and
    their difference). Returns (the set with provenance, its manifest, stage info).
    """
    from kdbackdoor.attacks.distill_poisoning import DistillPoisonConfig, craft_poisoned_set
    from kdbackdoor.attacks.engines import build_engine
    from kdbackdoor.data.poisoned_set import MANIFEST_FILE, load_poisoned_set, save_poisoned_set
    from kdbackdoor.models.generator import load_generator
    from kdbackdoor.triggers import build_trigger
    from kdbackdoor.triggers.show import render_change_grid

    section = config.poison
    spec = poison_spec(config, teacher_info.key)

    def build(folder: Path) -> None:
        data = transfer()
        seed = config.stage_seed("poison")
        trigger = build_trigger(section.trigger, image_shape=data.image_shape, seed=seed)
        generator = load_generator(section.generator, device) if section.generator else None
        engine = build_engine(section.method, generator_model=generator, **section.engine)
        poison_config = DistillPoisonConfig(**section.model_dump(exclude={"trigger", "method", "engine", "generator",
                                                                          "seed"}), seed=seed)
        poisoned, report = craft_poisoned_set(teacher, data, trigger, engine, poison_config, device=device,
                                              progress=progress)
        rows = poisoned.provenance.poisoned.nonzero().squeeze(1)[:8]
        render_change_grid(data.pixels(poisoned.provenance.source_index[rows]), poisoned.pixels(rows),
                           folder / "poisons.png")
        manifest = {"dataset": spec["transfer"], "teacher": {"stage_key": teacher_info.key, "path": teacher_info.path},
                    "trigger": trigger.config(), "target": poison_config.target, "engine": engine.config(),
                    "config": poison_config.model_dump(), **report}
        save_poisoned_set(poisoned, folder, manifest, artifacts=["poisons.png"])

    info = cached_stage(cache, "poisoned-sets", spec, lambda folder: (folder / MANIFEST_FILE).is_file(), build)
    data, manifest = load_poisoned_set(info.path)
    return data, manifest, info
