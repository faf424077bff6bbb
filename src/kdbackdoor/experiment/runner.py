"""Run one experiment: teacher, optional poisoned set, student, evaluation, record.

A run lives in ``RESULTS/runs/<run_id>/`` (``run_id``: hash of the config's identity):

    config.yaml     the resolved config (every default filled in)
    log.txt         what happened, stage by stage (appended when a run is continued)
    student/        the distilled student (checkpoint, its own metrics.json, training state)
    trigger.png     the evaluated trigger on test images; poisons.png (poisons beside their
                    clean sources) when the set was poisoned; synthetic samples stay in student/
    metrics.json    the run record, written last: a run is complete exactly when it exists

Teachers and poisoned sets are cached stages in ``RESULTS/cache`` (see ``stages``), shared
by every run of the results folder. ``run_experiment`` on a complete run returns its record
without work; on an interrupted one it continues where the student's training stopped.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
from functools import cached_property
from pathlib import Path

import torch
import yaml

from kdbackdoor.atomic import atomic_path, locked, write_json
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.config import DATASET_METHODS, ExperimentConfig
from kdbackdoor.experiment.distillation import check_available, distill_student
from kdbackdoor.experiment.stages import poison_stage, teacher_stage, transfer_seed
from kdbackdoor.experiment.tracking import check_tracking, track_run
from kdbackdoor.run_record import upgrade_fields
from kdbackdoor.numerics import use_numerics
from kdbackdoor.runtime import cpu_generator, select_device

log = logging.getLogger("kdbackdoor.experiment")

RUN_FORMAT = "kdbackdoor-experiment-run/1"
RUNS_DIR = "runs"
CACHE_DIR = "cache"
RECORD_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.txt"
STUDENT_DIR = "student"
TEST_SUBSET_SEED = 0  # one evaluation subset for every run


def run_dir(results: str | Path, config: ExperimentConfig) -> Path:
    """The folder of ``config``'s run inside a results folder."""
    return Path(results) / RUNS_DIR / config.run_id()


def is_complete(folder: str | Path) -> bool:
    """A run is complete exactly when its record exists."""
    return (Path(folder) / RECORD_FILE).is_file()


def preflight(config: ExperimentConfig) -> None:
    """Check what can be checked without loading data: names, files, method availability.

    Raises ``KDBackdoorError`` naming the config key.
    """
    from kdbackdoor.data.sources import SOURCES  # importing sources registers them
    from kdbackdoor.models.registry import ARCHITECTURES
    from kdbackdoor.triggers import parse_spec

    def fail(key: str, problem: str) -> None:
        raise KDBackdoorError(f"{key}: {problem}")

    for key, spec in (("data.dataset", config.data.dataset), ("distill.data", config.distill.data)):
        if spec is not None and spec.partition(":")[0] not in SOURCES:
            fail(key, str(SOURCES.unknown(spec)))
    for key, arch in (("teacher.arch", config.teacher.arch), ("distill.student_arch", config.distill.student_arch)):
        if arch not in ARCHITECTURES:
            fail(key, str(ARCHITECTURES.unknown(arch)))
    triggers = {"teacher.backdoor.trigger": config.teacher.backdoor and config.teacher.backdoor.trigger,
                "poison.trigger": config.poison and config.poison.trigger,
                "evaluation.trigger": config.evaluation.trigger}
    for key, spec in triggers.items():
        if spec:
            try:
                parse_spec(spec)
            except KDBackdoorError as exc:
                fail(key, str(exc))
    files = {"teacher.checkpoint": config.teacher.checkpoint, "teacher.adv_model": config.teacher.adv_model,
             "poison.generator": config.poison and config.poison.generator}
    for key, path in files.items():
        if path and not Path(path).exists():
            fail(key, f"{path} does not exist")
    if config.poison is not None and config.poison.method == "generative" and not config.poison.generator:
        fail("poison.generator", "the generative engine needs a generator checkpoint")
    check_available(config)
    check_tracking(config.tracking)


class ExperimentData:
    """The run's data sets, loaded on first use."""

    def __init__(self, config: ExperimentConfig, progress: bool) -> None:
        self.config, self.progress = config, progress

    def _load(self, spec: str, split: str) -> ImageDataset:
        from kdbackdoor.data.sources import load_dataset
        section = self.config.data
        return load_dataset(spec, split, data_dir=section.data_dir, resize=section.resize, progress=self.progress)

    @cached_property
    def train(self) -> ImageDataset:
        return self._load(self.config.data.dataset, "train")

    @cached_property
    def test(self) -> ImageDataset:
        test = self._load(self.config.data.dataset, "test")
        size = self.config.data.test_subset
        return _subset(test, size, TEST_SUBSET_SEED) if size else test

    @cached_property
    def transfer(self) -> ImageDataset:
        section = self.config.distill
        data = self._load(section.data, "train") if section.data else self.train
        return _subset(data, section.subset, transfer_seed(self.config)) if section.subset else data


def _subset(data: ImageDataset, size: int, seed: int) -> ImageDataset:
    if size >= len(data):
        return data
    rows = torch.randperm(len(data), generator=cpu_generator(seed))[:size].sort()[0]
    return data.subset(rows, name=f"{data.name}[subset {size}]")


def run_experiment(config: ExperimentConfig, results: str | Path, *, label: dict | None = None,
                   sweep: str | None = None, progress: bool = True) -> dict:
    """Run ``config`` in ``results`` (see the module docstring); return its run record.

    ``label`` (the values a sweep varied) and ``sweep`` (its name) go into the record.
    Raises ``KDBackdoorError`` for bad input, before any work where it can be checked.
    """
    results = Path(results)
    folder = run_dir(results, config)
    if is_complete(folder):
        return read_record(folder)
    preflight(config)
    with locked(folder):  # a second process on the same run (another sweep) waits, then finds it complete
        if is_complete(folder):
            return read_record(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / CONFIG_FILE) as tmp:
            tmp.write_text(yaml.safe_dump(config.to_data(), sort_keys=False))
        handler = logging.FileHandler(folder / LOG_FILE)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            log.info("run %s (%s) started", config.run_id(), config.name)
            with use_numerics(config.runtime.numerics()):
                record = _execute(config, results, folder, label or {}, sweep, progress)
            log.info("run %s complete: ACC %.4f%s", config.run_id(), record["metrics"]["acc"],
                     f", ASR {record['metrics']['asr']:.4f}" if "asr" in record["metrics"] else "")
            return record
        except BaseException as exc:
            log.error("run %s failed: %s", config.run_id(), exc, exc_info=not isinstance(exc, KDBackdoorError))
            raise
        finally:
            log.removeHandler(handler)
            handler.close()


def record_of_model(model: str | Path) -> dict | None:
    """The record of the experiment run whose folder holds ``model`` (a checkpoint file or folder,
    e.g. ``RESULTS/runs/<id>/student``), or None when it lies in no run folder."""
    path = Path(model).resolve()
    for folder in [path, *path.parents][:4]:
        record_path = folder / RECORD_FILE
        if record_path.is_file():  # a student folder holds its own record too: look further up
            try:
                record = read_record(folder)
            except (OSError, ValueError):
                continue
            if record.get("format") == RUN_FORMAT:
                return record
    return None


def read_record(folder: str | Path) -> dict:
    """The record of a complete run (fields of older records under today's names)."""
    return upgrade_fields(json.loads((Path(folder) / RECORD_FILE).read_text()))


def _execute(config: ExperimentConfig, results: Path, folder: Path, label: dict, sweep: str | None,
             progress: bool) -> dict:
    started = time.perf_counter()
    device = select_device(config.device)
    cache = results / CACHE_DIR
    data = ExperimentData(config, progress)
    test = data.test
    teacher, teacher_record, teacher_info = teacher_stage(config, cache, lambda: data.train, test, device=device,
                                                          progress=progress)
    stages = {"teacher": teacher_info.record()}
    transfer, manifest = None, None
    if config.poison is not None:
        transfer, manifest, poison_info = poison_stage(config, cache, teacher, teacher_info, lambda: data.transfer,
                                                       device=device, progress=progress)
        stages["poisoned_set"] = poison_info.record()
    elif config.distill.method in DATASET_METHODS:
        transfer = data.transfer
    backdoor = evaluation_backdoor(config, manifest, teacher_record, test.image_shape)
    log.info("distilling %s (%s, defense %s)", config.distill.student_arch, config.distill.method,
             config.distill.defense)
    metadata = {"experiment_run": config.run_id(), "teacher": {"stage": teacher_info.record()}}
    record = distill_student(config, teacher, transfer, test, folder / STUDENT_DIR, device=device,
                             backdoor=backdoor, progress=progress, metadata=metadata)
    artifacts = _artifacts(folder, backdoor, test, stages)
    run_record = {
        "format": RUN_FORMAT,
        "run_id": config.run_id(),
        "name": config.name,
        "sweep": sweep,
        "label": label,
        "config": config.to_data(),
        "metrics": record["metrics"],
        "teacher_metrics": record.get("teacher_metrics") or teacher_record.get("metrics"),
        "baseline_metrics": (record.get("baseline") or {}).get("metrics"),
        "poisoned_set": {key: manifest.get(key) for key in ("counts", "teacher_stability", "trigger", "engine")}
        if manifest else None,
        "defense": record.get("defense"),
        "stages": stages,
        "artifacts": artifacts,
        "seconds": time.perf_counter() - started,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": record.get("environment"),
    }
    write_json(folder / RECORD_FILE, run_record)
    track_run(config.tracking, results, run_record, record.get("history") or [])
    return run_record


def evaluation_backdoor(config: ExperimentConfig, manifest: dict | None, teacher_record: dict,
                        image_shape: tuple[int, int, int]):
    """The backdoor the student's ASR is measured for: ``evaluation.trigger``, else the poisoned
    set's, else the teacher's recorded one, else none."""
    from kdbackdoor.distill.record import Backdoor
    from kdbackdoor.triggers import build_trigger

    section = config.evaluation
    recorded = manifest or teacher_record.get("backdoor") or {}
    target = section.target if section.target is not None else recorded.get("target")
    if section.trigger:
        if target is None:
            raise KDBackdoorError("evaluation.target: needed with evaluation.trigger (nothing else records a target)")
        return Backdoor(build_trigger(section.trigger, image_shape=image_shape, seed=config.seed), target)
    if recorded.get("trigger"):
        sources = (manifest or {}).get("config", {}).get("source_classes")
        return Backdoor(build_trigger(recorded["trigger"]), target, sources)
    if section.target is not None:
        raise KDBackdoorError("evaluation.target: given without evaluation.trigger, and neither the poisoned set "
                              "nor the teacher records a trigger")
    return None


def _artifacts(folder: Path, backdoor, test: ImageDataset, stages: dict) -> dict:
    """Pictures for people: the trigger, the poisons, the synthetic samples (paths relative to ``folder``)."""
    from kdbackdoor.distill.data_free import SAMPLES_FILE
    from kdbackdoor.triggers import render_trigger_grid

    artifacts = {}
    if backdoor is not None:
        render_trigger_grid(backdoor.trigger, test.pixels(torch.arange(min(8, len(test)))), folder / "trigger.png")
        artifacts["trigger"] = "trigger.png"
    if "poisoned_set" in stages:
        with atomic_path(folder / "poisons.png") as tmp:
            shutil.copyfile(Path(stages["poisoned_set"]["path"]) / "poisons.png", tmp)
        artifacts["poisons"] = "poisons.png"
    if (folder / STUDENT_DIR / SAMPLES_FILE).is_file():
        artifacts["synthetic"] = f"{STUDENT_DIR}/{SAMPLES_FILE}"
    return artifacts
