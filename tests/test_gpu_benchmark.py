"""benchmarks/gpu.py: its CPU smoke mode runs end to end within its budget and writes a well-formed
report naming the device; kit projections add up the measured rates exactly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("precision", "hot_paths_bf16", "hot_paths_fp32", "zskt", "packed", "teacher", "quality", "compile")


def test_smoke_run_writes_a_report_that_names_the_device(tmp_path):
    budget = 45
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--budget", str(budget), "--grace", "20",
                           "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=budget + 120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert data["status"] == "finished" and data["device"] == "cpu" and data["device_name"].startswith("CPU")
    assert data["torch"] and data["machine"]["torch"] == data["torch"]
    for name in SECTIONS:  # each section ran, or says why not
        assert name in data["sections"] or data["skipped"].get(name), name
    assert "not run at smoke size" in data["skipped"]["compile"]
    rates = data["sections"]["precision"]["archs"]["small-cnn"]["images_per_s"]
    assert set(rates) == {"fp32-nchw", "fp32-cl", "bf16-cl"} and all(v > 0 for v in rates.values())
    assert set(data["projections"]) == {p.stem for p in (ROOT / "configs" / "paper").glob("*.yaml")}
    report = (tmp_path / "gpu_smoke.md").read_text()
    assert data["device_name"] in report and data["torch"] in report


def test_projection_adds_each_stage_at_its_measured_rate(import_benchmark):
    projection = import_benchmark("gpu_projection")
    measured = {"sections": {
        "precision": {"archs": {"wrn-16-2": {"images_per_s": {"bf16-cl": 10000.0}},
                                "resnet18": {"images_per_s": {"bf16-cl": 2000.0}}}},
        "hot_paths_bf16": {"dataset_kd": {"ratio_augmented": 0.5, "medians": {"toolkit_augmented": 8000.0}},
                           "pgd": {"medians": {"toolkit": 20000.0}}},
        "zskt": {"seconds_per_iteration": {"plain": 0.1, "abd_vaccine": 0.2, "abd_sr_phase": 1.0}},
        "packed": {"throughput_over_one": {"1": 1.0, "4": 2.0}},
    }}
    kits = projection.project_kits(measured)
    abd = kits["abd-cifar10"]
    assert abd["runs"] == 30 and abd["teachers"] == 10 and abd["not_projected"] == []
    stages = abd["seconds_by_stage"]
    # ten teachers: 200 epochs of 95% of 50,000 images at 10,000 x 0.5 img/s
    assert stages["teacher"] == pytest.approx(10 * 200 * 47500 / 5000)
    zskt = 10 * 80000 * 0.1
    abd_runs = 10 * 80000 * (0.9925 * 0.2 + 0.0075 * 1.0)
    clean_kd = 10 * 170 * 10000 / 8000
    assert stages["student"] == pytest.approx(zskt + abd_runs + clean_kd)
    assert abd["hours_four_packed"] == pytest.approx(abd["hours_one_at_a_time"] / 2)
    attack = kits["distill-attack-cifar10"]
    assert attack["teachers"] == 1
    poisons = round(0.05 * 50000 / 0.95)  # 5% of the final set, added
    pgd_rate = 20000.0 * 2000 / 10000  # WRN-16-2's PGD rate scaled by the bare training rates
    steps_per_trigger = 1 + 20 + 300  # fgsm, pgd, cw (100 steps x 3 searches)
    assert attack["seconds_by_stage"]["poisons"] == pytest.approx(3 * poisons * steps_per_trigger / pgd_rate)
    assert math.isfinite(attack["hours_one_at_a_time"])
    assert "cmi wrn-16-2 -> wrn-16-1" in kits["abd-cifar10-cmi"]["not_projected"]
