"""The index of runs: ``RESULTS/index.csv``, one row per run, for pandas or a spreadsheet.

Columns: ``run_id``, ``status`` (running | complete | failed), ``sweep``, ``name``, the
headline metrics as fractions in [0, 1] (``acc``, ``asr``, ``teacher_acc``, ``teacher_asr``,
``baseline_acc``, ``baseline_asr``), ``seconds``, ``finished``, ``error``, ``run_dir``
(relative to the results folder), then every config key flattened (``config.distill.kd.kd_lambda``).
Rows are keyed by ``run_id``: updating a run replaces its row, so a run appears once however
often it was started. Every update reads, changes and atomically replaces the file while
holding ``index.csv.lock``, so concurrent sweeps sharing a results folder lose no row.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

from kdbackdoor.atomic import atomic_path, locked

INDEX_FILE = "index.csv"
STATUSES = ("running", "complete", "failed")
LEADING = ("run_id", "status", "sweep", "name", "acc", "asr", "teacher_acc", "teacher_asr", "baseline_acc",
           "baseline_asr", "seconds", "finished", "error", "run_dir")


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists become JSON text."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, dict)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def record_row(record: dict, run_dir: str) -> dict:
    """The index row of a complete run, from its run record."""
    def metric(section: str, key: str):
        return (record.get(section) or {}).get(key)
    return {
        "run_id": record["run_id"], "status": "complete", "sweep": record.get("sweep"), "name": record.get("name"),
        "acc": metric("metrics", "acc"), "asr": metric("metrics", "asr"),
        "teacher_acc": metric("teacher_metrics", "acc"), "teacher_asr": metric("teacher_metrics", "asr"),
        "baseline_acc": metric("baseline_metrics", "acc"), "baseline_asr": metric("baseline_metrics", "asr"),
        "seconds": record.get("seconds"), "finished": record.get("finished"), "error": None, "run_dir": run_dir,
        **flatten(record["config"], "config."),
    }


def status_row(run_id: str, status: str, run_dir: str, config: dict, *, sweep: str | None = None,
               error: str | None = None) -> dict:
    """The index row of a run that is not complete (running, or failed with ``error``)."""
    return {"run_id": run_id, "status": status, "sweep": sweep, "name": config.get("name"), "error": error,
            "run_dir": run_dir, **flatten(config, "config.")}


def read_index(path: str | Path) -> list[dict[str, str]]:
    """The rows of an index file (or of ``RESULTS/index.csv``) as dicts of strings; [] if absent."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def update_index(results: str | Path, rows: Iterable[dict]) -> None:
    """Insert or replace ``rows`` (by ``run_id``) in ``RESULTS/index.csv``, atomically and locked."""
    rows = list(rows)
    if not rows:
        return
    path = Path(results) / INDEX_FILE
    with locked(path):
        table = {row["run_id"]: row for row in read_index(path)}
        for row in rows:
            table[row["run_id"]] = {key: _cell(value) for key, value in row.items()}
        columns = list(LEADING) + sorted({key for row in table.values() for key in row} - set(LEADING))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(table.values())
        with atomic_path(path) as tmp:
            tmp.write_text(text.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
