"""Run the reliability tests, keep what they recorded as a result file, and write
docs/reliability.md from it.

Every fault-injection, bad-input and fuzzing test notes each case it handled (after its
assertions passed) in a JSON-lines log (``tests/reliability_support.record_outcome``); a case
that is not handled fails its test instead. This script runs the tests with the log switched
on and writes ``benchmarks/results/reliability.json`` (the cases, the tests that ran, failed or
were skipped, the machine, this command); the page counts process kills, disk faults, hostile
files, fuzz cases and concurrent writes apart, then lists every kind of case.

    .venv/bin/python benchmarks/reliability_table.py           # run the tests, write both
    .venv/bin/python benchmarks/reliability_table.py --page    # rewrite the page from the result file
    .venv/bin/python benchmarks/reliability_table.py --check   # exit 1 if the page is out of date
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from kdbackdoor.atomic import read_jsonl, write_json  # noqa: E402
from pages import RESULTS, Page, load  # noqa: E402
import pages  # noqa: E402

PAGE = ROOT / "docs" / "reliability.md"
RESULT = "reliability"

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
KINDS = ["process kills", "disk faults", "hostile files", "fuzz cases", "concurrent writes", "other bad input",
         "determinism checks"]
HOSTILE = ("pickle", "hostile", "tampered", "truncated", "bad weights", "fails to decode")


def kind(row: dict) -> str:
    """Which of ``KINDS`` a recorded case is."""
    group, case = row["group"], row["case"].lower()
    if group == "crash (SIGKILL) and resume" or "sigkill" in case:
        return "process kills"
    if group == "disk full / unwritable output" or "write failing" in case:
        return "disk faults"
    if group == "concurrency and atomic writes":
        return "concurrent writes"
    if group == "fuzzing":
        return "fuzz cases"
    if group == "determinism":
        return "determinism checks"
    return "hostile files" if any(word in case for word in HOSTILE) else "other bad input"


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


def render(data: dict) -> str:
    """docs/reliability.md from the result file."""
    rows, failed, skipped = data["rows"], data["failed"], data["skipped"]
    counts = {name: [0, 0] for name in KINDS}  # kinds of case, instances
    seen: set[tuple[str, str]] = set()
    for row in rows:
        entry = counts[kind(row)]
        entry[1] += row["count"]
        if (row["group"], row["case"]) not in seen:
            seen.add((row["group"], row["case"]))
            entry[0] += 1
    machine = data["machine"]
    lines = [
        "# Reliability: faults injected, bad inputs tried",
        "",
        "<!-- generated by benchmarks/reliability_table.py from benchmarks/results/reliability.json -->",
        "",
        f"Written from the outcomes that the reliability tests (`{' '.join(data['test_files'])}`) recorded "
        f"on {machine['date']} (Python {machine['python']}, torch {machine['torch']}, {data['cpu_count']} CPU "
        f"cores): {len(data['tests'])} tests in {data['seconds']:.0f} s, {len(failed)} failed, "
        f"{len(skipped)} skipped. Command: `{data['command']}`.",
        "",
        "| kind | kinds of case | instances |",
        "|---|---:|---:|",
        *(f"| {name} | {n_cases} | {n} |" for name, (n_cases, n) in counts.items() if n_cases),
        f"| **all** | {len(seen)} | {sum(n for _, n in counts.values())} |",
        "",
        "*Handled* means the test's assertions held: for a crash, the resumed run's metrics equal an "
        "uninterrupted run's with the same seed and no file was half-written (the process kills itself at "
        "a seeded, named point of the run: `kdbackdoor.stop_points`); for a full or unwritable disk, a clear "
        "error (exit code 2), no run marked complete, no temporary left, and `--resume` then completed the "
        "run; for a bad or hostile input, exit code 2 and a one-line message naming the file, sample or "
        "option, no traceback, nothing executed and no output folder.",
        "",
        *table(rows, failed),
        "",
    ]
    if skipped:
        lines += ["Skipped there:", "", *(f"- `{name}`: {reason}" for name, reason in skipped), ""]
    lines += [
        "Not counted here: a killed sweep and two sweeps sharing one results index are tested with the sweep "
        "runner (`tests/test_sweep.py`), which appends index rows through `kdbackdoor.atomic.append_jsonl` "
        "(the concurrency rows above test that helper).",
        "",
    ]
    return "\n".join(lines)


PAGES = [Page(PAGE, lambda _: render(load(RESULT)))]


def collected_tests() -> list[str]:
    """Node ids of the reliability tests as pytest collects them now (the result file must list the same)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *TESTS],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sorted(line for line in out.splitlines() if "::" in line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", action="store_true", help="only rewrite the page from the result file")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -m slow)")
    args = parser.parse_args()
    if args.check or args.page:
        return pages.main(PAGES, ["--check"] if args.check else [])
    with tempfile.TemporaryDirectory() as tmp:
        log, junit = Path(tmp) / "outcomes.jsonl", Path(tmp) / "junit.xml"
        code, seconds = run_tests(log, junit, args.pytest_args)
        rows = read_jsonl(log)
        _, failed, skipped = test_results(junit)
    machine = {"python": platform.python_version(), "torch": __import__("torch").__version__,
               "platform": platform.platform(),
               "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    write_json(RESULTS / f"{RESULT}.json", {
        "machine": machine, "command": " ".join(["benchmarks/reliability_table.py", *sys.argv[1:]]),
        "cpu_count": os.cpu_count(), "seconds": seconds, "test_files": TESTS, "tests": collected_tests(),
        "failed": failed, "skipped": skipped, "rows": rows})
    pages.main(PAGES, [])
    handled = sum(row["count"] for row in rows)
    print(f"{handled} cases recorded, {len(failed)} failed tests -> {PAGE}")
    return 1 if code not in (0, 5) or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
