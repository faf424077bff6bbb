"""Pages made from committed result files are current, and README stays a front page."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pages  # noqa: E402
import results_pages  # noqa: E402


def test_generated_pages_match_the_result_files():
    assert pages.stale(results_pages.PAGES) == [], "run python benchmarks/results_pages.py"


def test_a_changed_result_makes_its_page_stale(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- BEGIN generated: x -->\nold\n<!-- END generated: x -->\nend\n")
    fresh = pages.Page(page, lambda text: pages.replace_block(text, "x", "new"))
    assert pages.stale([fresh]) == [page]
    assert pages.main([fresh], []) == 0
    assert page.read_text() == "intro\n<!-- BEGIN generated: x -->\nnew\n<!-- END generated: x -->\nend\n"
    assert pages.stale([fresh]) == [] and pages.main([fresh], ["--check"]) == 0


def test_every_figure_of_the_readme_results_links_to_a_committed_file():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for block in ("demo", "results"):
        body = readme.split(f"<!-- BEGIN generated: {block} -->")[1].split(f"<!-- END generated: {block} -->")[0]
        links = re.findall(r"\]\((benchmarks/results/[^)]+\.json)\)", body)
        cells = [cell.strip() for line in body.splitlines() if line.startswith("|") for cell in line.split("|")[2:]]
        figures = [cell for cell in cells if re.search(r"\d", cell)]
        assert figures and all("](benchmarks/results/" in figure for figure in figures)
        unlinked = [re.sub(r"\[[^]]+\]\([^)]+\)", "", figure) for figure in figures]
        assert not [text for text in unlinked if re.search(r"\d+\.\d|\d+ of \d+", text)], unlinked
        assert all((ROOT / link).is_file() for link in links)
