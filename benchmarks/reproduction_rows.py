"""Running one row of the reproduction grid (``reproduction_grid.py``) in the current process.

Rows share artifacts under the work folder: the teachers (``teachers/NAME``) and the poisoned
sets (``attack/seedS/sets/...``). Each artifact is made under a file lock by the first row that
needs it; rows running beside it in other processes wait and then reuse it. Every artifact and
student resumes from its checkpoint, so a row cut short goes on where it stopped next time. A
finished row writes ``rows/ROW.json`` (atomically, last): the runner skips rows that have one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from backdoor_transfer import teacher_backdoor
from common import SHARED
from distill_attack import poisoned_set, student
from kdbackdoor.atomic import write_json
from reproduction_grid import SCALES, Row

TARGET = 0
ROWS_DIR = "rows"


def device_name(device: torch.device) -> str:
    """The accelerator's name (e.g. 'NVIDIA H200'), else 'cpu (ARCH)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


@contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path`` (released when the block or the process ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class RowContext:
    """What rows of one scale share in one process: device, data, teachers."""

    def __init__(self, scale_name: str, work: Path, data_dir: Path | None = None) -> None:
        from kdbackdoor.runtime import select_device
        self.scale_name, self.scale, self.work = scale_name, SCALES[scale_name], Path(work)
        self.device = select_device("auto")
        data_dir = Path(data_dir) if data_dir else SHARED / "data"
        self.spec = ("digits" if self.scale["data"] == "digits"
                     else f"imagefolder:{(data_dir / 'cifar10-jpeg').resolve()}")

    @functools.cached_property
    def train(self):
        from kdbackdoor.data.sources import load_dataset
        return load_dataset(self.spec, "train", progress=False)

    @functools.cached_property
    def full_test(self):
        from kdbackdoor.data.sources import load_dataset
        return load_dataset(self.spec, "test", progress=False)

    def test(self, every: int):
        """Every ``every``-th test image (the same images for every row of a kind)."""
        return self.full_test.subset(torch.arange(0, len(self.full_test), every),
                                     name=f"{self.full_test.name}[::{every}]")

    def teacher(self, name: str):
        """(model, checkpoint sidecar) of teacher ``name`` ('clean' or a trigger), trained on first use."""
        from kdbackdoor.models import load_checkpoint
        folder = self.work / "teachers" / name
        with locked(self.work / "teachers" / f".{name}.lock"):
            if not (folder / "metrics.json").exists():
                self._train_teacher(name, folder)
        return load_checkpoint(folder, device=self.device)

    def _train_teacher(self, name: str, folder: Path) -> None:
        from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
        from kdbackdoor.teacher import train_teacher
        from kdbackdoor.training import TrainConfig
        from kdbackdoor.triggers import build_trigger
        recipe = dict(self.scale["clean_teacher" if name == "clean" else "backdoor_teacher"])
        arch = recipe.pop("arch")
        config = TrainConfig(**recipe, eval_every=0, seed=0)
        trigger = None if name == "clean" else build_trigger(name, image_shape=self.train.image_shape, seed=0)
        poison = None if trigger is None else PoisonConfig(target=TARGET, rate=self.scale["poison_rate"], seed=0)
        train_teacher(self.train, self.full_test, arch, config, folder, device=self.device, resume=True,
                      progress=False, metadata={"dataset": {"spec": self.spec, "data_dir": None, "resize": None}},
                      trigger=trigger, poison=poison)


def run_row(row: Row, context: RowContext, command: str) -> dict:
    """Run ``row`` (reusing whatever it shares with other rows) and write its result file, which
    records ``command`` (the runner's call that made it) and a command that makes this row alone."""
    started = time.perf_counter()
    runner = {"teacher": _teacher_row, "attack": _attack_row, "zskt": _zskt_row, "clean-kd": _clean_kd_row}[row.kind]
    result = runner(row, context)
    result = {"row": row.id, "group": row.group, "kind": row.kind, "seed": row.seed, "params": row.params,
              "scale": context.scale_name, "command": command,
              "row_command": f"python benchmarks/reproduction.py --scale {context.scale_name} --rows {row.id}",
              "device": device_name(context.device), "torch": torch.__version__,
              "seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    write_json(context.work / ROWS_DIR / f"{row.id}.json", result)
    return result


def finished_row(work: Path, row_id: str) -> dict | None:
    path = Path(work) / ROWS_DIR / f"{row_id}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _metrics(record: dict) -> dict:
    keep = ("acc", "asr", "target_without_trigger")
    return {key: record["metrics"][key] for key in keep if key in record["metrics"]}


def _teacher_row(row: Row, context: RowContext) -> dict:
    name = row.id.removeprefix("teacher-")
    context.teacher(name)
    record = json.loads((context.work / "teachers" / name / "metrics.json").read_text())
    return {"metrics": _metrics(record), "arch": record["arch"], "config": record["config"],
            "backdoor": record["backdoor"], "test": record["test"]}


def _attack_row(row: Row, context: RowContext) -> dict:
    from kdbackdoor.distill.record import Backdoor
    from kdbackdoor.training import TrainConfig
    from kdbackdoor.triggers import build_trigger
    recipe, p = context.scale["attack"], row.params
    teacher, _ = context.teacher("clean")
    train = context.train
    if recipe["subset"] and recipe["subset"] < len(train):  # the same images at every seed, as distill_attack.py
        rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:recipe["subset"]].sort()[0]
        train = train.subset(rows, name=f"{train.name}[{recipe['subset']}]")
    test = context.test(recipe["test_every"])
    out = context.work / "attack" / f"seed{row.seed}"
    with locked(out / f".{p['engine']}-{p['size']}.lock"):
        data, manifest = poisoned_set(out, teacher, train, p["engine"], recipe["rate"], p["size"], row.seed,
                                      recipe["engines"][p["engine"]])
    if not p["poisoned"]:
        data = data.subset(~data.provenance.poisoned, name=f"{train.name}-unpoisoned")
    elif p["label_mode"] == "original":  # the source image's own label on every poison
        labels = torch.where(data.provenance.poisoned, data.provenance.original_label, data.labels)
        data = dataclasses.replace(data, labels=labels, name=f"{data.name}-original-labels")
    config = TrainConfig(epochs=recipe["epochs"], batch_size=128, lr=0.05, crop_padding=0, hflip=False,
                         eval_every=0, seed=row.seed)
    backdoor = Backdoor(build_trigger(manifest["trigger"]), TARGET)
    record = student(out, row.id, teacher, data, test, backdoor, p["kd_lambda"], config, recipe["student"])
    result = {"metrics": _metrics(record), "train": record["train"], "test_size": len(test),
              "student": recipe["student"], "config": config.model_dump()}
    if p["poisoned"]:
        result["poisons"] = {"counts": manifest["counts"], "teacher_stability": manifest["teacher_stability"]}
    return result


def _zskt_row(row: Row, context: RowContext) -> dict:
    import kdbackdoor.defenses  # noqa: F401  (registers the defenses)
    from kdbackdoor.defenses.self_retrospection import SelfRetrospectionConfig
    from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccineConfig
    from kdbackdoor.distill.data_free import distill_data_free
    from kdbackdoor.distill.hooks import build_defense
    from kdbackdoor.distill.data_free_config import DataFreeConfig
    p, scale = row.params, context.scale
    teacher, sidecar = context.teacher(p["trigger"])
    # ABD's published ZSKT sweeps run the vaccine without its tail test; the ablation turns it on
    vaccine = ShufflingVaccineConfig(coefficient=p.get("sv_coefficient", 0.1), tail_test=p.get("sv_tail_test", False),
                                     seed=row.seed)
    retrospection = SelfRetrospectionConfig(start=p.get("sr_start", scale["sr_start"]), rounds=p.get("sr_rounds", 10),
                                            seed=row.seed)
    settings = {**scale["zskt"], **({"iterations": p["iterations"]} if "iterations" in p else {})}
    config = DataFreeConfig(method="zskt", seed=row.seed, **settings)
    defense = build_defense(p["defense"], "zskt", vaccine=vaccine, retrospection=retrospection)
    _, record = distill_data_free(teacher, context.test(scale["test_every"]), scale["student"], config,
                                  context.work / "runs" / row.id, device=context.device,
                                  backdoor=teacher_backdoor(sidecar), defense=defense, resume=True, progress=False)
    return {"metrics": _metrics(record), "teacher_metrics": record.get("teacher_metrics"),
            "config": config.model_dump(), "defense": record.get("defense"),
            "defense_settings": {"vaccine": vaccine.model_dump(), "retrospection": retrospection.model_dump()}
            if p["defense"] != "none" else None,
            "history": record.get("history"), "throughput": record.get("throughput"),
            "resumed_from_iteration": record.get("resumed_from_iteration")}


def _clean_kd_row(row: Row, context: RowContext) -> dict:
    from kdbackdoor.distill.dataset_kd import distill
    from kdbackdoor.distill.losses import KDConfig
    from kdbackdoor.training import TrainConfig
    scale = context.scale
    teacher, sidecar = context.teacher(row.params["trigger"])
    config = TrainConfig(epochs=scale["clean_kd_epochs"], batch_size=128, lr=0.05, crop_padding=0, hflip=False,
                         eval_every=0, seed=row.seed)
    kd = KDConfig(kd_lambda=1.0, temperature=4.0)
    _, record = distill(teacher, context.train, context.test(scale["test_every"]), scale["student"], config, kd,
                        context.work / "runs" / row.id, device=context.device, backdoor=teacher_backdoor(sidecar),
                        resume=True, progress=False)
    return {"metrics": _metrics(record), "teacher_metrics": record.get("teacher_metrics"),
            "config": config.model_dump(), "kd": kd.model_dump()}
