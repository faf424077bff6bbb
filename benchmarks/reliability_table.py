"""Run the reliability tests and write docs/reliability.md from what they recorded.

Every fault-injection, bad-input and fuzzing test notes each case it handled (after its
assertions passed) in a JSON-lines log (``tests/reliability_support.record_outcome``); a case
that is not handled fails its test instead. This script runs the tests with the log switched
on, then writes one table row per kind of fault or input: how many times it was injected or
tried and the outcome, followed by any failed or skipped test.

    .venv/bin/python benchmarks/reliability_table.py            # the default (CI) set
    .venv/bin/python benchmarks/reliability_table.py --out docs/reliability.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kdbackdoor.atomic import atomic_path, read_jsonl  # noqa: E402

TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_reliability_*.py"))
GROUP_OF_MODULE = {  # where a failed test's cases belong
    "test_reliability_resume": "crash (SIGKILL) and resume",
    "test_reliability_disk": "disk full / unwritable output",
    "test_reliability_inputs": "bad input",
    "test_reliability_fuzz": "fuzzing",
    "test_reliability_atomic": "concurrency and atomic writes",
}
GROUP_ORDER = ["crash (SIGKILL) and resume", "disk full / unwritable output", "concurrency and atomic writes",
               "determinism", "bad input", "fuzzing"]


def run_tests(log: Path, junit: Path, extra: list[str]) -> tuple[int, float]:
    env = {**os.environ, "KDBACKDOOR_RELIABILITY_LOG": str(log)}
    started = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                            *TESTS, *extra], cwd=ROOT, env=env)
    return code, time.perf_counter() - started


def test_results(junit: Path) -> tuple[int, list[str], list[tuple[str, str]]]:
    """(tests run, failed test ids, (skipped test id, reason))."""
    failed, skipped, total = [], [], 0
    for case in ET.parse(junit).getroot().iter("testcase"):
        total += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif (skip := case.find("skipped")) is not None:
            skipped.append((name, skip.get("message", "")))
    return total, failed, skipped


def table(rows: list[dict], failed: list[str]) -> list[str]:
    cases = defaultdict(lambda: {"count": 0, "details": []})
    for row in rows:
        entry = cases[(row["group"], row["case"])]
        entry["count"] += row["count"]
        if row["detail"] and row["detail"] not in entry["details"]:
            entry["details"].append(row["detail"])
    lines = ["| Group | Fault injected / input tried | Times / cases | Examples | Outcome |",
             "|---|---|---:|---|---|"]
    order = {group: i for i, group in enumerate(GROUP_ORDER)}
    for (group, case), entry in sorted(cases.items(), key=lambda item: (order.get(item[0][0], 99), item[0][1])):
        details = "; ".join(entry["details"][:4]) + ("; …" if len(entry["details"]) > 4 else "")
        lines.append(f"| {group} | {case} | {entry['count']} | {details} | handled, nothing lost |")
    for name in failed:
        module = name.split("::")[0].rsplit(".", 1)[-1]
        lines.append(f"| {GROUP_OF_MODULE.get(module, module)} | **test failed: `{name}`** | – | – | "
                     "**NOT handled** |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -m slow)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log, junit = Path(tmp) / "outcomes.jsonl", Path(tmp) / "junit.xml"
        code, seconds = run_tests(log, junit, args.pytest_args)
        rows = read_jsonl(log)
        total, failed, skipped = test_results(junit)
    handled = sum(row["count"] for row in rows)
    lines = [
        "# Reliability: faults injected, bad inputs tried",
        "",
        "Written by `benchmarks/reliability_table.py` from the outcomes that the reliability tests "
        f"(`{' '.join(TESTS)}`) record; do not edit by hand.",
        "",
        f"- Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.platform()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores; {total} tests in {seconds:.0f} s "
        f"(wall clock), {len(failed)} failed, {len(skipped)} skipped.",
        f"- {handled} injected faults and bad inputs in all; every row below is one kind. *Handled* means the "
        "test's assertions held: for a crash, the resumed run's metrics equal an uninterrupted run's with the "
        "same seed and no file was half-written; for a full or unwritable disk, a clear error (exit code 2), "
        "no run marked complete, no temporary left, and `--resume` then completed the run; for a bad input, "
        "exit code 2 and a one-line message naming the file, sample or option, no traceback, no output folder.",
        "",
        *table(rows, failed),
        "",
    ]
    if skipped:
        lines += ["Skipped here:", "", *(f"- `{name}`: {reason}" for name, reason in skipped), ""]
    lines += [
        "Not covered here: faults in sweeps (a killed sweep, two sweeps sharing one results index) are "
        "tested with the sweep runner, which appends index rows through `kdbackdoor.atomic.append_jsonl` "
        "(the concurrency rows above test that helper).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines))
    print(f"{handled} cases recorded, {len(failed)} failed tests → {args.out}")
    return 1 if code not in (0, 5) or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
