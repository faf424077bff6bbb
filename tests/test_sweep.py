"""Runs, stage caching, sweep expansion, resume after a kill, the index under concurrency, Ray."""

import csv
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kdbackdoor import stop_points
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.config import apply_overrides, validate_config
from kdbackdoor.experiment.index import read_index, update_index
from kdbackdoor.experiment.runner import is_complete, run_experiment
from kdbackdoor.experiment import sweep as sweep_module
from kdbackdoor.experiment.sweep import SweepSpec, expand, load_sweep, run_sweep

FAST = {"epochs": 1, "batch_size": 64, "lr": 0.05, "crop_padding": 0, "hflip": False, "eval_every": 0}
TINY = {"name": "tiny", "data": {"dataset": "digits", "test_subset": 200},
        "teacher": {"train": FAST}, "distill": {"train": FAST, "subset": 300}}
TINY_YAML = """name: tiny
data: {dataset: digits, test_subset: 200}
teacher:
  train: {epochs: 1, batch_size: 64, lr: 0.05, crop_padding: 0, hflip: false, eval_every: 0}
distill:
  subset: 300
  train: {epochs: 1, batch_size: 64, lr: 0.05, crop_padding: 0, hflip: false, eval_every: 0}
"""


def tiny(**overrides):
    return validate_config(apply_overrides(TINY, overrides))


def sweep_file(folder: Path, name: str, body: str) -> Path:
    (folder / "base.yaml").write_text(TINY_YAML)
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: base.yaml\n{body}")
    return path


def test_a_second_run_reuses_the_teacher_and_a_changed_teacher_does_not(tmp_path):
    first = run_experiment(tiny(), tmp_path, progress=False)
    teacher = Path(first["stages"]["teacher"]["path"])
    weights = teacher / "model.safetensors"
    trained_at = weights.stat().st_mtime_ns
    second = run_experiment(tiny(**{"distill.kd.kd_lambda": 1.0}), tmp_path, progress=False)
    assert first["stages"]["teacher"]["cached"] is False and second["stages"]["teacher"]["cached"] is True
    assert second["stages"]["teacher"]["path"] == str(teacher) and weights.stat().st_mtime_ns == trained_at
    assert second["run_id"] != first["run_id"]
    assert len(list((tmp_path / "cache" / "teachers").glob("*/model.safetensors"))) == 1
    third = run_experiment(tiny(**{"teacher.train.lr": 0.02}), tmp_path, progress=False)
    assert third["stages"]["teacher"]["cached"] is False and third["stages"]["teacher"]["path"] != str(teacher)
    # a complete run is returned as it is, without work
    again = run_experiment(tiny(), tmp_path, progress=False)
    assert again == first
    folder = tmp_path / "runs" / first["run_id"]
    for name in ("config.yaml", "log.txt", "metrics.json", "student/model.safetensors"):
        assert (folder / name).is_file()
    assert validate_config(__import__("yaml").safe_load((folder / "config.yaml").read_text())).run_id() == first["run_id"]
    assert first["teacher_metrics"]["acc"] > 0.3  # chance is 0.1


def test_data_free_run_is_checked_for_the_teachers_backdoor(tmp_path):
    config = tiny(**{"teacher.backdoor": {"trigger": "badnets-grid", "target": 1}, "distill.method": "zskt",
                     "distill.subset": None, "distill.data_free": {"iterations": 2, "batch_size": 16, "student_steps": 1}})
    record = run_experiment(config, tmp_path, progress=False)
    folder = tmp_path / "runs" / record["run_id"]
    assert record["teacher_metrics"]["asr"] >= 0 and "asr" in record["metrics"]  # the teacher's recorded trigger
    assert record["artifacts"] == {"trigger": "trigger.png", "synthetic": "student/samples.png"}
    assert (folder / "trigger.png").is_file() and (folder / "student" / "samples.png").is_file()
    assert record["stages"]["teacher"]["cached"] is False and "poisoned_set" not in record["stages"]


def test_ood_run_takes_abd(tmp_path):
    """An experiment's OOD distillation with ABD: both halves are configured from the config and act."""
    config = tiny(**{"teacher.backdoor": {"trigger": "badnets-grid", "target": 1}, "distill.method": "ood",
                     "distill.data": "digits", "distill.kd.kd_lambda": 1.0, "distill.defense": "abd",
                     "distill.vaccine": {"tail_test": False}, "distill.retrospection": {"rounds": 1}})
    record = run_experiment(config, tmp_path, progress=False)
    sv, sr = record["defense"]["parts"]
    assert record["defense"]["name"] == "abd" and sv["enabled"] is True and sv["transfer_images"] == 300
    assert sr["config"]["rounds"] == 1 and sr["steps"] == 5  # every step of 1 epoch × 300 / 64


def test_grid_zip_and_seeds_expand_in_order():
    spec = SweepSpec(name="s", grid={"distill.kd.kd_lambda": [0.5, 1.0], "distill.student_arch": ["small-cnn"]},
                     zip={"distill.kd.temperature": [2, 4, 8], "teacher.train.epochs": [1, 2, 3]}, seeds=[0, 1])
    runs = expand(spec, TINY)
    assert len(runs) == 2 * 1 * 3 * 2
    assert runs[0].label == {"distill.kd.kd_lambda": 0.5, "distill.student_arch": "small-cnn",
                             "distill.kd.temperature": 2, "teacher.train.epochs": 1, "seed": 0}
    assert runs[1].label["seed"] == 1 and runs[2].label["distill.kd.temperature"] == 4
    zipped = {(r.config.distill.kd.temperature, r.config.teacher.train.epochs) for r in runs}
    assert zipped == {(2.0, 1), (4.0, 2), (8.0, 3)}  # zipped values never mix
    assert len({r.run_id for r in runs}) == len(runs)
    # identical configs are run once
    assert len(expand(SweepSpec(name="d", grid={"name": ["a", "b"]}), TINY)) == 1


def test_bad_sweeps_fail_before_any_run(tmp_path):
    with pytest.raises(KDBackdoorError, match="lists of one group must have equal lengths"):
        load_sweep(sweep_file(tmp_path, "z", "zip: {distill.kd.kd_lambda: [0, 1], seed: [1]}\n"))
    with pytest.raises(KDBackdoorError, match=r"run distill.kd.kd_lambda=3\).*distill.kd.kd_lambda: Input should be"):
        load_sweep(sweep_file(tmp_path, "g", "grid: {distill.kd.kd_lambda: [0.5, 3]}\n"))
    with pytest.raises(KDBackdoorError, match="gird: unknown key; allowed here: name, base, config, overrides, grid"):
        load_sweep(sweep_file(tmp_path, "k", "gird: {seed: [1]}\n"))


def test_failed_runs_are_indexed_and_retried_while_others_complete(tmp_path):
    path = sweep_file(tmp_path, "f", f"grid: {{distill.data: [digits, 'npz:{tmp_path}/missing.npz']}}\n")
    spec, runs = load_sweep(path)
    results = tmp_path / "results"
    first = run_sweep(spec, runs, results, progress=False)
    assert len(first.completed) == 1 and len(first.failed) == 1
    failed_id = next(iter(first.failed))
    assert "missing.npz" in first.failed[failed_id]
    rows = {row["run_id"]: row for row in read_index(results)}
    assert rows[failed_id]["status"] == "failed" and "missing.npz" in rows[failed_id]["error"]
    assert rows[first.completed[0]]["status"] == "complete"
    events = []
    second = run_sweep(spec, runs, results, progress=False, on_event=lambda kind, run_id, _: events.append((kind, run_id)))
    assert second.skipped == first.completed and list(second.failed) == [failed_id]
    assert ("start", failed_id) in events and ("start", first.completed[0]) not in events


def test_resume_after_a_killed_sweep_completes_every_run_once(tmp_path):
    path = sweep_file(tmp_path, "kill", "grid: {distill.kd.kd_lambda: [0.0, 0.25, 0.5, 0.75]}\n")
    results = tmp_path / "results"
    # the sweep stops itself after the second run's record is written, before the index says so
    env = {**os.environ, "OMP_NUM_THREADS": "1", stop_points.ENV: "sweep-run-finished:2"}
    process = subprocess.run([sys.executable, "-m", "kdbackdoor.cli", "sweep", str(path), "--results", str(results),
                              "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             timeout=1200)
    assert process.returncode == -signal.SIGKILL
    spec, runs = load_sweep(path)
    # complete = its record exists (the kill landed after a record was written, before the index was)
    done_before = {run.run_id for run in runs if is_complete(results / "runs" / run.run_id)}
    assert len(done_before) == 2
    assert sum(row["status"] == "complete" for row in read_index(results)) == 1
    result = run_sweep(spec, runs, results, progress=False)
    assert set(result.skipped) == done_before and not result.failed
    assert set(result.completed) == {run.run_id for run in runs} - done_before
    rows = read_index(results)
    assert sorted(row["run_id"] for row in rows) == sorted(run.run_id for run in runs)  # one row per run
    assert all(row["status"] == "complete" for row in rows)
    again = run_sweep(spec, runs, results, progress=False)
    assert again.completed == [] and len(again.skipped) == 4  # a finished sweep does no work


def test_jobs_2_runs_every_run_once_with_its_own_log(tmp_path):
    """The local worker pool (forked workers here: one torch thread each on this 2-core machine)."""
    path = sweep_file(tmp_path, "pool", "grid: {distill.kd.kd_lambda: [0.0, 1.0]}\nseeds: [0, 1]\n")
    spec, runs = load_sweep(path)
    results = tmp_path / "results"
    events = []
    result = run_sweep(spec, runs, results, jobs=2, progress=False, on_event=lambda kind, run_id, _: events.append(
        (kind, run_id)))
    assert not result.failed and sorted(result.completed) == sorted(run.run_id for run in runs)
    assert sorted(run_id for kind, run_id in events if kind == "start") == sorted(result.completed)
    rows = read_index(results)
    assert len(rows) == 4 and all(row["status"] == "complete" for row in rows)
    for run in runs:  # a run's log holds its own lines only, wherever the run ran
        log_text = (results / "runs" / run.run_id / "log.txt").read_text()
        assert log_text.count(" started") == 1 and f"run {run.run_id} (" in log_text
        assert log_text.count(" complete: ") == 1
    assert run_sweep(spec, runs, results, jobs=2, progress=False).completed == []


@pytest.mark.slow  # the fork server imports the toolkit first: about 45 s here
def test_workers_with_several_threads_come_from_the_fork_server(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # two threads per worker: forking is not safe
    assert sweep_module._worker_context(2).get_start_method() == "forkserver"
    spec, runs = load_sweep(sweep_file(tmp_path, "fs", "grid: {distill.kd.kd_lambda: [0.0, 1.0]}\n"))
    result = run_sweep(spec, runs, tmp_path / "results", jobs=2, progress=False)
    assert not result.failed and sorted(result.completed) == sorted(run.run_id for run in runs)


def in_processes(calls, timeout: float = 900) -> None:
    """Run ``(function, args)`` calls in fresh processes at the same time; each must succeed."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=function, args=args) for function, args in calls]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(timeout)
            assert worker.exitcode == 0
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()


def _hammer(results: str, prefix: str) -> None:
    for i in range(40):
        update_index(results, [{"run_id": f"{prefix}{i}", "status": "complete", "acc": i}])


def test_index_updates_from_two_processes_lose_no_row(tmp_path):
    in_processes([(_hammer, (str(tmp_path), prefix)) for prefix in ("a", "b")])
    rows = read_index(tmp_path)
    assert sorted(row["run_id"] for row in rows) == sorted(f"{p}{i}" for p in "ab" for i in range(40))
    with open(tmp_path / "index.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 81  # header + one line per run, nothing torn


def _sweep_process(path: str, results: str, jobs: int) -> None:
    spec, runs = load_sweep(path)
    result = run_sweep(spec, runs, results, jobs=jobs, progress=False)
    assert not result.failed, result.failed


@pytest.mark.slow  # four interpreters importing torch: tens of seconds even on an idle machine
def test_two_concurrent_sweeps_share_a_results_folder(tmp_path):
    first = sweep_file(tmp_path, "one", "grid: {distill.kd.kd_lambda: [0.5, 1.0]}\n")
    second = sweep_file(tmp_path, "two", "grid: {distill.kd.kd_lambda: [1.0, 0.0]}\n")
    results = tmp_path / "results"
    in_processes([(_sweep_process, (str(first), str(results), 2)), (_sweep_process, (str(second), str(results), 1))])
    rows = read_index(results)
    assert len(rows) == 3 and len({row["run_id"] for row in rows}) == 3
    assert all(row["status"] == "complete" for row in rows)
    for row in rows:  # the run both sweeps share was run once
        assert (results / row["run_dir"] / "log.txt").read_text().count("started") == 1
    assert len(list((results / "cache" / "teachers").glob("*/model.safetensors"))) == 1


def test_ray_backend_on_a_local_instance(tmp_path):
    """Runs in the default suite (about 50 s): CI checks the Ray backend against a local instance."""
    pytest.importorskip("ray")
    path = sweep_file(tmp_path, "ray", "grid: {distill.kd.kd_lambda: [0.5, 1.0]}\n")
    spec, runs = load_sweep(path)
    results = tmp_path / "results"
    result = run_sweep(spec, runs, results, jobs=2, backend="ray", progress=False)
    assert not result.failed and sorted(result.completed) == sorted(run.run_id for run in runs)
    rows = read_index(results)
    assert len(rows) == 2 and all(row["status"] == "complete" for row in rows)
    assert len(list((results / "cache" / "teachers").glob("*/model.safetensors"))) == 1
