"""The project speaks of itself: its pages, code and tests never refer to the work periods in
which it was made, to work items or their goals, or to the history of the machines it ran on.
Dates, versions and commit ids say when something was measured."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = {
    "a numbered work session": re.compile(r"\bsessions?[ -]\d|\b(this|last|that|the) session'?s?\b(?! fixture)",
                                          re.IGNORECASE),
    "a work item": re.compile(r"\bissue's\b|\bthe issue\b|\bissue \d|#\d+ \(issue", re.IGNORECASE),
    "a work goal": re.compile(r"project'?s target|inside the target|the issue's target", re.IGNORECASE),
    "the history of a machine": re.compile(r"\b(slower|faster|previous|earlier|our) machine|'s machine\b|"
                                           r"\bthat machine\b", re.IGNORECASE),
    "the people who made it": re.compile(r"\b(coordinator|helper session|work period)s?\b", re.IGNORECASE),
}
FOLDERS = ("docs", "benchmarks", "src", "tests", "configs")
SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".txt", ".cfg"}


def project_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in FOLDERS:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and p.is_file()
                  and ".egg-info" not in str(p) and "__pycache__" not in p.parts]
    return sorted(f for f in files if f.exists() and f.name != Path(__file__).name)


def offending_lines(text: str) -> list[tuple[int, str, str]]:
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in PATTERNS.items():
            if pattern.search(line):
                hits.append((number, what, line.strip()[:120]))
    return hits


def test_no_page_or_source_speaks_of_how_it_was_made():
    found = [f"{path.relative_to(ROOT)}:{n}: {what}: {line}"
             for path in project_files() for n, what, line in offending_lines(path.read_text(errors="replace"))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("line", ["measured in session 9", "on session 8's slower machine", "the issue's target",
                                  "inside the project's target of 85%", "Sessions 13-15 ran it",
                                  "this session's share"])
def test_the_check_catches_such_wording(line):
    assert offending_lines(line)


@pytest.mark.parametrize("line", ['@pytest.fixture(scope="session")', "measured on 2026-11-22 (commit 6d131e9)",
                                  "a 2-core AMD EPYC CPU", "the target class", "issues a warning"])
def test_the_check_leaves_ordinary_wording_alone(line):
    assert not offending_lines(line)
