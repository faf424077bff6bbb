"""The matrix's leaderboard: per cell (attack × method × defense) mean ± std over seeds.

Per cell, from the complete runs' records (shares in [0, 1], shown in %):
- ``acc``: the student's clean test accuracy; ``asr``: its attack success rate;
- ``target_without_trigger``: share of non-target test images it puts in the target class
  without the trigger (an attack that only biases the student towards the target shows here);
- ``transfer``: student ASR / teacher ASR, per seed (how much of the teacher's backdoor got through);
- ``acc_cost``: the undefended student's ACC minus the defended one's, paired by seed (0 for
  ``none``; positive = the defense costs accuracy).

Per attack and method, the **best defense** is the one with the lowest mean ASR among those
whose mean ``acc_cost`` is at most ``max_acc_cost``, provided it lowers the ASR below the
undefended cell's; otherwise ``none``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from kdbackdoor.atomic import write_bytes, write_json
from kdbackdoor.experiment.matrix import Matrix
from kdbackdoor.experiment.report import render_html, render_markdown
from kdbackdoor.experiment.runner import is_complete, read_record, run_dir
from kdbackdoor.experiment.summary import Table

LEADERBOARD = "leaderboard"
FIELDS = ("acc", "asr", "target_without_trigger", "transfer", "acc_cost")


def collect(matrix: Matrix, results: str | Path) -> list[dict]:
    """One row per complete run: its label, run id and the per-run numbers (``transfer`` None
    when the teacher's ASR is 0)."""
    rows = []
    for run in matrix.runs:
        folder = run_dir(results, run.config)
        if not is_complete(folder):
            continue
        record = read_record(folder)
        student, teacher = record["metrics"], record.get("teacher_metrics") or {}
        teacher_asr = teacher.get("asr")
        rows.append({**run.label, "run_id": run.run_id, "acc": student["acc"], "asr": student.get("asr"),
                     "target_without_trigger": student.get("target_without_trigger"),
                     "teacher_acc": teacher.get("acc"), "teacher_asr": teacher_asr,
                     "transfer": student["asr"] / teacher_asr if teacher_asr and "asr" in student else None,
                     "seconds": record.get("seconds")})
    undefended = {(r["attack"], r["method"], r["seed"]): r["acc"] for r in rows if r["defense"] == "none"}
    for row in rows:
        reference = undefended.get((row["attack"], row["method"], row["seed"]))
        row["acc_cost"] = None if reference is None else reference - row["acc"]
    return rows


def aggregate(rows: list[dict], matrix: Matrix) -> list[dict]:
    """Cells in the matrix's order with mean, std and count of each field over seeds."""
    cells = []
    for attack in matrix.spec.attacks:
        for method in matrix.spec.methods:
            for defense in matrix.spec.defenses:
                mine = [r for r in rows if (r["attack"], r["method"], r["defense"]) == (attack, method, defense)]
                if not mine:
                    continue
                cell = {"attack": attack, "method": method, "defense": defense, "seeds": len(mine),
                        "teacher_asr": _stats([r["teacher_asr"] for r in mine])}
                cell.update({name: _stats([r[name] for r in mine]) for name in FIELDS})
                cells.append(cell)
    _mark_best(cells, matrix.spec.max_acc_cost)
    return cells


def _stats(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _mark_best(cells: list[dict], max_acc_cost: float) -> None:
    for cell in cells:
        cell["best"] = False
    groups: dict[tuple[str, str], list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["attack"], cell["method"]), []).append(cell)
    for group in groups.values():
        reference = next((c for c in group if c["defense"] == "none"), None)
        if reference is None or reference["asr"] is None:
            continue
        allowed = [c for c in group if c["defense"] != "none" and c["asr"] is not None and c["acc_cost"] is not None
                   and c["acc_cost"]["mean"] <= max_acc_cost and c["asr"]["mean"] < reference["asr"]["mean"]]
        best = min(allowed, key=lambda c: c["asr"]["mean"]) if allowed else reference
        best["best"] = True


def _pct(stats: dict | None, signed: bool = False) -> str:
    if stats is None:
        return "–"
    mean, std = 100 * stats["mean"], 100 * stats["std"]
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"


def _ratio(stats: dict | None) -> str:
    return "–" if stats is None else f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def tables(cells: list[dict], matrix: Matrix) -> list[Table]:
    """The leaderboard table and the best-defense table."""
    cost = 100 * matrix.spec.max_acc_cost
    rows = [[c["attack"], c["method"], c["defense"] + (" ★" if c["best"] else ""), str(c["seeds"]),
             _pct(c["acc"]), _pct(c["asr"]), _pct(c["target_without_trigger"]), _ratio(c["transfer"]),
             _pct(c["acc_cost"], signed=True), _pct(c["teacher_asr"])] for c in cells]
    board = Table("Leaderboard", ["attack", "KD method", "defense", "seeds", "student ACC %", "student ASR %",
                                  "target w/o trigger %", "transfer (ASR/teacher ASR)", "ACC cost pp",
                                  "teacher ASR %"], rows,
                  f"mean ± std over seeds; ACC cost = undefended ACC − defended ACC (paired by seed); ★ = best "
                  f"defense of its attack and method: lowest ASR at an ACC cost ≤ {cost:g} pp")
    best = [[c["attack"], c["method"], c["defense"], _pct(c["asr"]), _pct(c["acc_cost"], signed=True)]
            for c in cells if c["best"]]
    summary = Table("Best defense per attack and KD method", ["attack", "KD method", "best defense", "ASR %",
                                                              "ACC cost pp"], best,
                    f"lowest mean ASR at a mean ACC cost ≤ {cost:g} pp; `none` when no defense lowers the ASR "
                    "within that cost")
    return [board, summary]


def write_leaderboard(matrix: Matrix, results: str | Path, command: str) -> dict[str, Path]:
    """Write ``leaderboard.json`` (per-run rows, cells, the command), ``.md`` and ``.html`` into
    ``results``; return their paths."""
    results = Path(results)
    rows = collect(matrix, results)
    cells = aggregate(rows, matrix)
    missing = len(matrix.runs) - len(rows)
    data = {"name": matrix.spec.name, "command": command, "max_acc_cost": matrix.spec.max_acc_cost,
            "runs_complete": len(rows), "runs_missing": missing, "cells_left_out": matrix.skipped,
            "cells": cells, "runs": rows}
    title = f"KD-backdoor matrix: {matrix.spec.name}"
    source = f"{len(rows)} complete runs of `{command}`" + (f" ({missing} not complete)" if missing else "")
    paths = {"json": results / f"{LEADERBOARD}.json", "md": results / f"{LEADERBOARD}.md",
             "html": results / f"{LEADERBOARD}.html"}
    write_json(paths["json"], data)
    board = tables(cells, matrix)
    write_bytes(paths["md"], render_markdown(title, source, board, [], [], paths["md"]).encode())
    write_bytes(paths["html"], render_html(title, source, board, [], []).encode())
    return paths
