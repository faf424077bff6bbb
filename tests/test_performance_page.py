"""docs/performance.md's generated blocks match the committed result files (or say, when the GPU
figures are absent, that they were not measured)."""

from __future__ import annotations


def test_performance_page_is_current(import_benchmark):
    page = import_benchmark("performance_page")
    from pages import stale
    assert stale(page.PAGES) == [], "run: python benchmarks/performance_page.py"


def test_gpu_block_never_shows_figures_without_a_result_file(import_benchmark):
    page = import_benchmark("performance_page")
    if not (page.RESULTS / "gpu.json").exists():
        assert "not measured" in page.gpu_block() and "|" not in page.gpu_block()
    else:
        assert page.gpu_block().startswith("Measured ")
