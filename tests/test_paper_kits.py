"""The paper-scale kits (configs/paper/): every one expands to valid runs at paper scale and at its
smoke scale; the smoke scale runs the same graph, resumes after a kill mid-run with every run
recorded once, and finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kdbackdoor import stop_points
from kdbackdoor.experiment.index import read_index
from kdbackdoor.experiment.runner import is_complete
from kdbackdoor.experiment.sweep import load_sweep, run_sweep

KITS = Path(__file__).resolve().parents[1] / "configs" / "paper"
NAMES = sorted(path.stem for path in KITS.glob("*.yaml"))


def _graph(runs) -> set:
    """What a kit computes, sizes aside: teacher trigger kind, method, defense, poisoning method."""
    return {(run.config.teacher.backdoor is not None, run.config.distill.method, run.config.distill.defense,
             run.config.poison.method if run.config.poison else None) for run in runs}


def test_the_kits_are_there():
    assert {"abd-cifar10", "abd-gtsrb", "abd-cifar10-cmi", "distill-attack-cifar10",
            "distill-attack-cifar100"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_kit_expands_at_paper_scale_and_smoke_runs_the_same_graph(name):
    spec, runs = load_sweep(KITS / f"{name}.yaml")
    _, smoke = load_sweep(KITS / f"{name}.yaml", scale="smoke")
    assert "smoke" in spec.scales and len(smoke) < len(runs)
    assert _graph(smoke) == _graph(runs)
    if name.startswith("abd"):
        assert {run.config.teacher.arch for run in runs} == {"wrn-16-2"}
        assert {run.config.teacher.backdoor.rate for run in runs} == {0.1}
        assert len({run.config.teacher.backdoor.trigger for run in runs}) == 10
    else:
        assert {run.config.distill.kd.kd_lambda for run in runs} == {0.0, 0.25, 0.5, 0.75, 1.0}
        assert {run.config.poison.method for run in runs} == {"fgsm", "pgd", "cw"}
        assert {run.config.teacher.arch for run in runs} == {run.config.distill.student_arch for run in runs} \
            == {"resnet18"}


def test_abd_kit_runs_zskt_for_80k_iterations():
    _, runs = load_sweep(KITS / "abd-cifar10.yaml")
    zskt = [run for run in runs if run.config.distill.method == "zskt"]
    assert len(zskt) == 20 and {run.config.distill.data_free["iterations"] for run in zskt} == {80000}


def test_smoke_kit_resumes_after_a_kill_and_records_every_run_once(tmp_path):
    path = KITS / "abd-cifar10.yaml"
    results = tmp_path / "results"
    # killed in the middle of the second data-free run (ZSKT + ABD): 4 iterations per run
    env = {**os.environ, "OMP_NUM_THREADS": "1", stop_points.ENV: "data-free-iteration:6"}
    command = [sys.executable, "-m", "kdbackdoor.cli", "sweep", str(path), "--scale", "smoke", "--results",
               str(results), "--no-progress"]
    killed = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    assert killed.returncode == -signal.SIGKILL
    spec, runs = load_sweep(path, scale="smoke")
    done_before = {run.run_id for run in runs if is_complete(results / "runs" / run.run_id)}
    assert 1 <= len(done_before) < len(runs)
    result = run_sweep(spec, runs, results, progress=False)
    assert not result.failed and set(result.skipped) == done_before
    rows = read_index(results)
    assert sorted(row["run_id"] for row in rows) == sorted(run.run_id for run in runs)
    assert all(row["status"] == "complete" for row in rows)


def test_attack_kit_smoke_finishes(tmp_path):
    spec, runs = load_sweep(KITS / "distill-attack-cifar10.yaml", scale="smoke")
    result = run_sweep(spec, runs, tmp_path, progress=False)
    assert not result.failed and len(result.completed) == len(runs) == 3


@pytest.mark.slow  # the same graphs as the two above, on other data sets and with CMI: minutes
@pytest.mark.parametrize("name", ["abd-gtsrb", "abd-cifar10-cmi", "distill-attack-cifar100"])
def test_other_kits_smoke_finishes(name, tmp_path):
    spec, runs = load_sweep(KITS / f"{name}.yaml", scale="smoke")
    result = run_sweep(spec, runs, tmp_path, progress=False)
    assert not result.failed and len(result.completed) == len(runs)
