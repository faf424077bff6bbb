"""Helpers shared by the reliability tests: run the CLI, record outcomes for docs/reliability.md.

``record_outcome`` appends one JSON line per handled fault or bad input to the file named by
``$KDBACKDOOR_RELIABILITY_LOG`` (set by ``benchmarks/reliability_table.py``); without it, it
does nothing. A case is recorded only after its assertions passed, so a failing case shows up
as a failed test, which the table script reports as not handled.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from kdbackdoor.atomic import TEMPORARY_GLOB, append_jsonl
from kdbackdoor.cli import main

LOG_ENV = "KDBACKDOOR_RELIABILITY_LOG"
FAST_TRAINING = ["--batch-size", "64", "--lr", "0.05", "--crop-padding", "0", "--no-hflip", "--eval-every", "0",
                 "--no-progress", "--device", "cpu"]


def record_outcome(group: str, case: str, detail: str = "", count: int = 1) -> None:
    """Note that ``count`` instances of ``case`` (a fault or a class of bad input) were handled."""
    path = os.environ.get(LOG_ENV)
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        append_jsonl(path, {"group": group, "case": case, "detail": detail, "count": count, "test": test})


def run_cli(*args) -> tuple[int, str, str]:
    """Run ``kdbackdoor ARGS`` in this process through the entry point; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(arg) for arg in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def assert_user_error(result: tuple[int, str, str], *needles: str) -> str:
    """The CLI refused with exit code 2 and a one-line message holding every needle; no traceback."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    flat = " ".join(err.split())  # rich may wrap long paths
    for needle in needles:
        assert needle in flat, (needle, err)
    return flat


def cli_process(*args, env: dict | None = None) -> subprocess.Popen:
    """Start ``kdbackdoor ARGS`` as a separate process with this process's torch thread count
    (CPU results depend on it), stdout/stderr captured."""
    full_env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", "from kdbackdoor.cli import main; main()", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def temporaries(folder: Path) -> list[Path]:
    """Leftovers of interrupted atomic writes under ``folder``."""
    return sorted(folder.rglob(TEMPORARY_GLOB))


VARYING_KEYS = ("seconds", "images_per_s", "throughput", "wall_seconds_this_run", "resumed_from_iteration",
                "created", "files", "path")


def comparable(record: dict) -> dict:
    """A run record without what legitimately differs between two runs of the same seed:
    timings, creation times, where a run was resumed, and paths that depend on the output folder."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VARYING_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return strip(record)
