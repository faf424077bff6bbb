"""Auditing a distillation set: run filters, write their scores, remove what they flag.

``run_filters`` decides from images, labels and models only; ``audit_report`` adds detection
quality against the provenance afterwards (when the set has it). Files: ``scores.csv`` (one
row per sample), ``audit.json`` (per-filter rule, counts and metrics), and with removal a
cleaned set in the poisoned-set format (``kdbackdoor.data.poisoned_set``).
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kdbackdoor.atomic import atomic_path, write_json
from kdbackdoor.data.dataset import ImageDataset, Provenance
from kdbackdoor.data.poisoned_set import save_poisoned_set
from kdbackdoor.defenses.filters.base import AuditContext, DataFilter, FilterResult, score_against_provenance
from kdbackdoor.models.compatibility import check_compatible

SCORES_FILE = "scores.csv"
AUDIT_FILE = "audit.json"
CLEANED_DIR = "cleaned"


def run_filters(
    data: ImageDataset, context: AuditContext, filters: list[DataFilter], *,
    expected_rate: float | None = None, progress: bool = True,
) -> list[tuple[FilterResult, float]]:
    """Run every filter on ``data``; returns ``(result, seconds)`` per filter, in order."""
    check_compatible(context.teacher, data)
    results = []
    columns = [TextColumn("[bold]audit"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[name]}"),
               TimeElapsedColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("audit", total=len(filters), name="")
        for data_filter in filters:
            bar.update(task, name=data_filter.name)
            started = time.perf_counter()
            result = data_filter.detect(data, context, expected_rate)
            results.append((result, time.perf_counter() - started))
            bar.advance(task)
    return results


def audit_report(data: ImageDataset, results: list[tuple[FilterResult, float]]) -> dict:
    """Per filter: rule, parameters, flagged count, seconds, details and, when ``data`` has
    provenance, ``detection`` (AUROC, TPR at 5% FPR, precision, recall against it)."""
    report = {}
    for result, seconds in results:
        entry = {"rule": result.rule, "params": result.params, "flagged": int(result.flags.sum()),
                 "seconds": seconds, "details": result.details}
        if data.provenance is not None:
            entry["detection"] = score_against_provenance(result, data.provenance.poisoned)
        report[result.name] = entry
    return report


def write_scores(path: str | os.PathLike, data: ImageDataset, results: list[tuple[FilterResult, float]]) -> None:
    """``scores.csv``: row, label, each filter's score and flag (0/1), then the provenance
    columns (poisoned, source_index, original_label) when the set has them, for reporting."""
    header = ["row", "label"]
    for result, _ in results:
        header += [f"{result.name}_score", f"{result.name}_flag"]
    columns = [torch.arange(len(data)).tolist(), data.labels.cpu().tolist()]
    for result, _ in results:
        columns += [[f"{s:.6g}" for s in result.scores.tolist()], result.flags.int().tolist()]
    if data.provenance is not None:
        header += ["poisoned", "source_index", "original_label"]
        prov = data.provenance
        columns += [prov.poisoned.int().tolist(), prov.source_index.tolist(), prov.original_label.tolist()]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(zip(*columns))


def remove_flagged(data: ImageDataset, results: list[tuple[FilterResult, float]]) -> tuple[ImageDataset, dict]:
    """``data`` without every sample flagged by any filter, and what was removed (rows of
    ``data``, count per filter). The cleaned set keeps provenance (a clean one if it had none)."""
    flagged = torch.zeros(len(data), dtype=torch.bool)
    for result, _ in results:
        flagged |= result.flags
    if data.provenance is None:
        data = ImageDataset(data.images, data.labels, data.classes, data.name, dict(data.meta),
                            Provenance.clean(data.labels))
    cleaned = data.subset(~flagged, name=f"{data.name}-filtered")
    removal = {"filters": [result.name for result, _ in results], "rule": "removed if flagged by any filter",
               "size_before": len(data), "removed": int(flagged.sum()), "size_after": len(cleaned),
               "removed_by_filter": {result.name: int(result.flags.sum()) for result, _ in results},
               "removed_rows": flagged.nonzero().squeeze(1).tolist()}
    return cleaned, removal


def save_cleaned(cleaned: ImageDataset, out_dir: str | os.PathLike, source_manifest: dict, removal: dict) -> Path:
    """Write the cleaned set as a poisoned-set folder: the source manifest's fields (trigger,
    target, data set...) plus ``filtered`` (what was removed and why); ``distill --dataset`` takes it."""
    inherited = {key: value for key, value in source_manifest.items()
                 if key not in ("format", "created", "kdbackdoor", "data_file", "data_sha256", "size", "poisoned",
                                "classes", "files")}
    return save_poisoned_set(cleaned, out_dir, {**inherited, "filtered": removal})


def write_audit(out_dir: str | os.PathLike, report: dict) -> Path:
    """Write ``audit.json`` (atomically) and return its path."""
    path = Path(out_dir) / AUDIT_FILE
    write_json(path, report)
    return path
