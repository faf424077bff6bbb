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
NOT_CONDITIONS = re.compile(r"^(seed|name|device|tracking\..*|runtime\..*|(teacher|poison|distill)\.seed)$")
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


# A defense's own settings: they vary with the defense, so they are not conditions of their own.
DEFENSE_KEYS = re.compile(r"^distill\.(defense|vaccine|retrospection|robust|robust_kd)(\.|$)")
DATA_FREE_METHODS = ("zskt", "dfad", "deepinversion", "cmi")
EXPERIMENT_TITLES = {"poisoned": "Poisoned distillation set (clean teacher)",
                     "data-free": "Data-free distillation", "ood": "Out-of-distribution distillation",
                     "dataset": "Distillation on clean data"}


def run_name(run: Run) -> str:
    """The run's name in its sweep (``name`` label), else its id."""
    return str((run.record.get("label") or {}).get("name") or run.record.get("name") or run.record["run_id"])


def experiment_kind(run: Run) -> str:
    """Which of ``EXPERIMENT_TITLES`` a run belongs to."""
    method = run.config.get("distill.method")
    if run.record.get("poisoned_set"):
        return "poisoned"
    return "data-free" if method in DATA_FREE_METHODS else "ood" if method == "ood" else "dataset"


def condition_keys(runs: list[Run]) -> list[str]:
    """The config keys that tell conditions apart: ``varied_keys``, but a defense's own settings only
    when they differ between runs that have the defense (not merely between defended and undefended)."""
    defended = [run for run in runs if run.config.get("distill.defense") not in (None, "none")]
    among_defended = set(varied_keys(defended))
    return [key for key in varied_keys(runs)
            if not DEFENSE_KEYS.match(key) or key == "distill.defense" or key in among_defended]


def settings_text(run: Run, keys: list[str]) -> str:
    """``key=value`` for the ``keys`` the run sets (short key names); a defense's own settings only
    when the run has that defense."""
    defended = run.config.get("distill.defense") not in (None, "none")
    parts = [f"{short_key(key)}={_fmt(run.config.get(key))}" for key in keys
             if run.config.get(key) is not None and (defended or not DEFENSE_KEYS.match(key)
                                                     or key == "distill.defense")]
    return ", ".join(parts) or "–"


def defense_seconds(run: Run) -> float | None:
    """Seconds the run's defense spent on its own work (sum over its parts), if it recorded them."""
    parts = (run.record.get("defense") or {}).get("parts") or []
    seconds = [part.get("seconds_this_run", part.get("seconds_this_session")) for part in parts]
    seconds = [value for value in seconds if value is not None]
    return sum(seconds) if seconds else None


def experiment_tables(runs: list[Run]) -> list[Table]:
    """One table per kind of experiment: a row per condition (named by its runs), only the settings
    that vary within the experiment, then ACC, ASR, target without trigger and what the defense cost
    (ACC against the same condition undefended, and its own seconds)."""
    tables = []
    for kind, title in EXPERIMENT_TITLES.items():
        members = [run for run in runs if experiment_kind(run) == kind]
        if not members:
            continue
        keys = condition_keys(members)
        conditions = group(members, keys)
        undefended = {tuple(v for k, v in zip(keys, values) if not DEFENSE_KEYS.match(k)): cell
                      for values, cell in conditions.items() if cell[0].config.get("distill.defense") in (None, "none")}
        rows = []
        for values, cell in conditions.items():
            names = sorted({run_name(run) for run in cell})
            reference = undefended.get(tuple(v for k, v in zip(keys, values) if not DEFENSE_KEYS.match(k)))
            defended = cell[0].config.get("distill.defense") not in (None, "none")
            cost = "–"
            if defended and reference and metric_values(cell, "acc") and metric_values(reference, "acc"):
                delta = mean_std(metric_values(cell, "acc"))[0] - mean_std(metric_values(reference, "acc"))[0]
                cost = f"ACC {100 * delta:+.1f}"
            seconds = [value for value in map(defense_seconds, cell) if value is not None]
            if defended and seconds:
                cost += f"; {sum(seconds) / len(seconds):.0f} s"
            rows.append([", ".join(names), settings_text(cell[0], keys), str(len(cell)),
                         stat(metric_values(cell, "acc")), stat(metric_values(cell, "asr")),
                         stat(metric_values(cell, "target_without_trigger")), cost])
        columns = ["run", "settings that vary" if keys else "settings", "n", "ACC", "ASR", "target w/o trigger",
                   "defense cost"]
        if kind == "poisoned" and metric_values(members, "baseline_asr"):
            columns[-1:-1] = ["unpoisoned ACC", "unpoisoned ASR"]
            for row, cell in zip(rows, conditions.values()):
                row[-1:-1] = [stat(metric_values(cell, "baseline_acc")), stat(metric_values(cell, "baseline_asr"))]
        tables.append(Table(title, columns, rows,
                            "percent, mean ± std over seeds (n runs); 'target w/o trigger': share of non-target test "
                            "images called the target without the trigger; defense cost: ACC change against the "
                            "same settings undefended, and the defense's own seconds"))
    return tables


def summary_table(runs: list[Run]) -> Table:
    """One row per run: its name, experiment, the teacher's and the student's ACC and ASR."""
    rows = [[run_name(run), EXPERIMENT_TITLES[experiment_kind(run)].split(" (")[0],
             stat(metric_values([run], "teacher_acc")), stat(metric_values([run], "teacher_asr")),
             stat(metric_values([run], "acc")), stat(metric_values([run], "asr"))]
            for run in sorted(runs, key=lambda run: (list(EXPERIMENT_TITLES).index(experiment_kind(run)), run_name(run)))]
    return Table("Summary", ["run", "experiment", "teacher ACC", "teacher ASR", "student ACC", "student ASR"], rows,
                 "percent; one row per run")


def abd_table(runs: list[Run]) -> Table | None:
    """ABD's layout, for runs that distil a backdoored teacher without its data (None if there are none)."""
    runs = [run for run in runs if run.config.get("teacher.backdoor.trigger") is not None
            and run.config.get("distill.method") in ABD_METHODS and not run.record.get("poisoned_set")]
    if not runs:
        return None
    other = [key for key in varied_keys(runs) if key not in ("teacher.backdoor.trigger", "distill.method")
             and not DEFENSE_KEYS.match(key)]
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
