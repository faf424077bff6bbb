"""docs/reliability.md is current: written from benchmarks/results/reliability.json, which lists the
reliability tests as they are now (a test added, removed or renamed since needs a new run of
benchmarks/reliability_table.py)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pages  # noqa: E402
import reliability_table  # noqa: E402


def test_the_page_matches_the_result_file():
    assert pages.stale(reliability_table.PAGES) == [], "run python benchmarks/reliability_table.py --page"


def test_the_result_file_covers_the_reliability_tests_of_today():
    recorded = pages.load(reliability_table.RESULT)
    assert sorted(recorded["tests"]) == reliability_table.collected_tests(), \
        "the reliability tests changed: run python benchmarks/reliability_table.py"
    assert recorded["failed"] == []


def test_cases_are_counted_by_kind():
    rows = [{"group": "crash (SIGKILL) and resume", "case": "SIGKILL during x", "count": 2},
            {"group": "concurrency and atomic writes", "case": "lock holder SIGKILLed", "count": 1},
            {"group": "concurrency and atomic writes", "case": "processes appending to one index", "count": 240},
            {"group": "bad input", "case": "malicious pickle checkpoint", "count": 6},
            {"group": "bad input", "case": "labels out of range", "count": 2},
            {"group": "fuzzing", "case": "typed configs", "count": 1300},
            {"group": "disk full / unwritable output", "case": "ENOSPC", "count": 6}]
    assert [reliability_table.kind(row) for row in rows] == [
        "process kills", "process kills", "concurrent writes", "hostile files", "other bad input", "fuzz cases",
        "disk faults"]
