"""Results of many runs as tables: conditions, mean ± std over seeds, the papers' layouts.

A *condition* is a run's config without its seeds; runs of one condition that differ only
in seeds are replicates, summarised as mean ± sample standard deviation (n − 1) of the
metric, in percent. The layouts follow the two papers:

- ABD (ICML 2023), Table 1: one row per teacher trigger; the teacher's ACC / ASR, then per
  distillation method the student's ACC / ASR without and with each defense.
- the attack (arXiv 2504.21323): ASR and ACC against λ, the manipulation method, the poison
  rate and the trigger, each beside the unpoisoned baseline where one was distilled.

Tables are plain data (``Table``) that ``report`` renders as HTML or Markdown.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.index import INDEX_FILE, flatten, read_index
from kdbackdoor.experiment.runner import RECORD_FILE, RUN_FORMAT

METRICS = {"acc": ("metrics", "acc"), "asr": ("metrics", "asr"),
           "target_without_trigger": ("metrics", "target_without_trigger"), "teacher_acc": ("teacher_metrics", "acc"),
           "teacher_asr": ("teacher_metrics", "asr"), "baseline_acc": ("baseline_metrics", "acc"),
           "baseline_asr": ("baseline_metrics", "asr")}
METRIC_TITLES = {"acc": "ACC", "asr": "ASR", "target_without_trigger": "target w/o trigger",
                 "teacher_acc": "teacher ACC", "teacher_asr": "teacher ASR",
                 "baseline_acc": "unpoisoned ACC", "baseline_asr": "unpoisoned ASR"}
# Config keys that are replicates or bookkeeping, not conditions.
NOT_CONDITIONS = re.compile(r"^(seed|name|device|tracking\..*|(teacher|poison|distill)\.seed)$")
ATTACK_FACTORS = {"distill.kd.kd_lambda": "λ", "poison.method": "manipulation method",
                  "poison.rate": "poison rate", "poison.trigger": "trigger"}
# ABD's columns, in its order; `dataset` is distillation on the clean training data (its reference).
ABD_METHODS = ("zskt", "dfad", "deepinversion", "cmi", "ood", "dataset")


@dataclass
class Run:
    """A complete run: its record, folder and flattened config (``distill.kd.kd_lambda``: 0.5)."""

    record: dict
    folder: Path
    config: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.config = flatten(self.record["config"])

    def metric(self, name: str) -> float | None:
        section, key = METRICS[name]
        value = (self.record.get(section) or {}).get(key)
        return None if value is None else float(value)


@dataclass
class Table:
    """A rendered table: cells are text; ``note`` says what the numbers are."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """The complete runs of results folders (their ``index.csv``), index files or run folders."""
    runs: dict[str, Run] = {}
    for path in map(Path, paths):
        if (path / RECORD_FILE).is_file():
            folders = [path]
        elif path.is_dir() or path.name == INDEX_FILE:
            results = path if path.is_dir() else path.parent
            if not (results / INDEX_FILE).is_file():
                raise KDBackdoorError(f"{path}: no {INDEX_FILE} (give a results folder of `kdbackdoor run`/`sweep`, "
                                      "its index.csv, or a run folder)")
            folders = [results / row["run_dir"] for row in read_index(results) if row["status"] == "complete"]
        else:
            raise KDBackdoorError(f"{path}: not a results folder, an {INDEX_FILE} or a run folder")
        for folder in folders:
            if not (folder / RECORD_FILE).is_file():
                continue  # indexed as complete but removed since
            record = json.loads((folder / RECORD_FILE).read_text())
            if record.get("format") == RUN_FORMAT:
                runs.setdefault(record["run_id"], Run(record, folder))
    return list(runs.values())


def varied_keys(runs: list[Run]) -> list[str]:
    """Config keys (not seeds) whose value differs between runs, in config order."""
    keys: list[str] = []
    for run in runs:
        keys.extend(key for key in run.config if key not in keys)
    return [key for key in keys if not NOT_CONDITIONS.match(key)
            and len({json.dumps(run.config.get(key), sort_keys=True) for run in runs}) > 1]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value) of a non-empty list."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def stat(values: list[float]) -> str:
    """Percent mean ± sample std of fractions; just the mean for one value; '–' for none."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{100 * mean:.1f}" if len(values) == 1 else f"{100 * mean:.1f} ± {100 * std:.1f}"


def group(runs: list[Run], keys: list[str]) -> dict[tuple, list[Run]]:
    """Runs by their values of ``keys``, groups in a natural order of those values."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.config.get(key) for key in keys), []).append(run)
    return dict(sorted(groups.items(), key=lambda item: tuple(_sort_key(v) for v in item[0])))


def metric_values(runs: list[Run], name: str) -> list[float]:
    return [value for value in (run.metric(name) for run in runs) if value is not None]


def conditions_table(runs: list[Run]) -> Table:
    """Every condition with n and mean ± std of each metric that any run has."""
    keys = varied_keys(runs)
    metrics = [name for name in METRICS if any(run.metric(name) is not None for run in runs)]
    rows = [[_fmt(value) for value in values] + [str(len(members))] + [stat(metric_values(members, name))
                                                                        for name in metrics]
            for values, members in group(runs, keys).items()]
    return Table("All conditions", [short_key(key) for key in keys] + ["n"] + [METRIC_TITLES[m] for m in metrics],
                 rows, "percent; mean ± std over seeds (n runs)")


def abd_table(runs: list[Run]) -> Table | None:
    """ABD's layout, for runs that distil a backdoored teacher without its data (None if there are none)."""
    runs = [run for run in runs if run.config.get("teacher.backdoor.trigger") is not None
            and run.config.get("distill.method") in ABD_METHODS and not run.record.get("poisoned_set")]
    if not runs:
        return None
    other = [key for key in varied_keys(runs) if key not in ("teacher.backdoor.trigger", "distill.method",
                                                             "distill.defense")]
    methods = sorted(group(runs, ["distill.method", "distill.defense"]),
                     key=lambda pair: (ABD_METHODS.index(pair[0]), pair[1] != "none", pair[1]))
    columns = [short_key(key) for key in other] + ["trigger", "teacher ACC / ASR"]
    columns += [(method if method != "dataset" else "clean-data KD") + ("" if defense == "none" else f" + {defense.upper()}")
                for method, defense in methods]
    rows = []
    for values, members in group(runs, other + ["teacher.backdoor.trigger"]).items():
        row = [_fmt(value) for value in values]
        row.append(f"{stat(metric_values(members, 'teacher_acc'))} / {stat(metric_values(members, 'teacher_asr'))}")
        cells = group(members, ["distill.method", "distill.defense"])
        for method in methods:
            cell = cells.get(method, [])
            row.append(f"{stat(metric_values(cell, 'acc'))} / {stat(metric_values(cell, 'asr'))}" if cell else "–")
        rows.append(row)
    return Table("Backdoored teacher, data-free distillation (ABD layout)", columns, rows,
                 "student ACC / ASR in percent, mean ± std over seeds; one row per teacher trigger")


def attack_tables(runs: list[Run]) -> list[Table]:
    """ASR/ACC against each attack factor the poisoned runs vary (λ, method, rate, trigger)."""
    runs = [run for run in runs if run.record.get("poisoned_set")]
    keys = varied_keys(runs)
    tables = []
    for factor, title in ATTACK_FACTORS.items():
        if factor not in keys:
            continue
        other = [key for key in keys if key != factor]
        metrics = [m for m in ("acc", "asr", "target_without_trigger", "baseline_acc", "baseline_asr")
                   if metric_values(runs, m)]
        rows = [[_fmt(value) for value in values] + [str(len(members))]
                + [stat(metric_values(members, m)) for m in metrics]
                for values, members in group(runs, other + [factor]).items()]
        tables.append(Table(f"Poisoned distillation set: ASR and ACC vs {title}",
                            [short_key(key) for key in other] + [title, "n"] + [METRIC_TITLES[m] for m in metrics],
                            rows, "student metrics in percent, mean ± std over seeds; 'target w/o trigger': "
                            "share of the non-target test images called the target with no trigger (ASR's floor); "
                            "'unpoisoned': the same distillation without the poisons"))
    return tables


def short_key(key: str) -> str:
    """A column title for a config key (its last two parts)."""
    return ".".join(key.split(".")[-2:])


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _sort_key(value: Any) -> tuple:
    """Numbers by value, text naturally (size=4 before size=12), None first."""
    if value is None:
        return (0,)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value))
    text = str(value)
    return (2, tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)))
