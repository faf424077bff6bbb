"""The performance benchmark (benchmarks/performance.py) runs at tiny sizes and gives well-formed,
positive numbers; timings themselves are not checked (they depend on the machine)."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def performance(import_benchmark):
    return import_benchmark("performance")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_run_is_well_formed(performance):
    settings = performance.Settings(**performance.TINY, df_methods=["zskt"])
    results = performance.run_all(settings, torch.device("cpu"))

    kd = results["kd"]
    for key in ("ratio_augmented", "ratio_cached", "matmul_peak_flops_per_s"):
        assert _positive(kd[key]), key
    assert all(_positive(v) for v in kd["medians"].values())
    assert all(_positive(v) for v in kd["flop_share"].values())
    assert kd["teacher_logits_cached"] == {"augmented": False, "no_augmentation": True}
    assert kd["training_flops_per_image"]["augmented"] > kd["training_flops_per_image"]["cached"] > 0

    assert [row["images"] for row in results["kd_scaling"]] == settings.scaling_sizes
    assert all(_positive(row["seconds_per_1k_images"]) for row in results["kd_scaling"])

    pgd = results["pgd"]
    assert _positive(pgd["ratio"])
    assert all(run["attempts"] >= run["kept"] > 0 for run in pgd["runs"])

    for method in settings.df_methods:
        row = results["data_free"][method]
        for key in ("sv_synthesis_overhead", "sr_student_overhead", "sr_student_overhead_amortised",
                    "abd_synthesis_overhead", "abd_student_overhead"):
            assert _positive(row[key]), (method, key)
        assert set(row["student_step_seconds"]) == set(performance.VARIANTS)

    memory = results["memory"]
    assert memory["cifar10_uint8"]["tensor_bytes"] >= 64 * 3 * 32 * 32
    assert memory["cmi"]["bank_bytes"] == memory["cmi"]["bank_size"] * memory["cmi"]["feature_dim"] * 4

    report = performance.markdown(results)
    assert "| hot path |" in report and "Data-free KD" in report and "Memory" in report


def test_profile_rows_are_well_formed(import_benchmark):
    ops = import_benchmark("common").top_ops(lambda: torch.mm(torch.rand(32, 32), torch.rand(32, 32)), rows=3)
    assert 0 < len(ops) <= 3
    assert all(op["calls"] >= 1 and op["self_cpu_ms"] >= 0 and 0 <= op["share"] <= 1 for op in ops)


def test_quick_settings_are_smaller(performance):
    quick, device = performance.settings_from_args(["--quick", "--device", "cpu", "--methods", "zskt"])
    full, _ = performance.settings_from_args(["--device", "cpu"])
    assert device.type == "cpu" and quick.df_methods == ["zskt"]
    assert quick.kd_images < full.kd_images and max(quick.scaling_sizes) < max(full.scaling_sizes)
