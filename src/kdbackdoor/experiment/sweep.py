"""Sweeps: grids and zipped lists over config keys, with seeds, run locally or on Ray.

A sweep file (YAML)::

    name: attack-lambda
    base: base-cpu.yaml                # an experiment config, relative to this file
    overrides: {distill.train.epochs: 5}   # fixed changes (dotted keys)
    grid:                              # every combination
      distill.kd.kd_lambda: [0, 0.5, 1]
      poison.method: [fgsm, pgd]
    zip:                               # lists varied together (a mapping, or a list of them)
      poison.trigger: [badnets-square:size=4, badnets-square:size=8]
      evaluation.trigger: [badnets-square:size=4, badnets-square:size=8]
    seeds: [0, 1, 2]                   # sets `seed`; one run per seed

Every run is validated before the first starts. Runs go to ``RESULTS/runs/<run_id>``; one
whose record exists is skipped, so calling the sweep again re-runs only the failed and the
interrupted ones, and a finished sweep does no work. Backends: ``local`` (sequential, or
``jobs`` worker processes) and ``ray`` (a Ray cluster, or a local instance); the index
``RESULTS/index.csv`` is updated as runs start and end.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdbackdoor import stop_points
from kdbackdoor.atomic import write_json
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.config import (ExperimentConfig, apply_overrides, describe_errors, parse_overrides,
                                          read_yaml, validate_config)
from kdbackdoor.experiment.index import record_row, status_row, update_index
from kdbackdoor.experiment.runner import RUNS_DIR, is_complete, preflight, read_record, run_dir, run_experiment

log = logging.getLogger("kdbackdoor.experiment")

SWEEPS_DIR = "sweeps"
BACKENDS = ("local", "ray")
RAY_RETRIES = 3  # resubmissions of a run whose Ray worker or node died


class SweepSpec(BaseModel):
    """A sweep file's contents."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="the sweep's name (index column `sweep`)")
    base: Optional[str] = Field(None, description="experiment config file, relative to the sweep file")
    config: dict[str, Any] = Field(default_factory=dict, description="an inline experiment config (nested keys), "
                                   "merged over `base`")
    overrides: dict[str, Any] = Field(default_factory=dict, description="fixed dotted-key changes")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values; all combinations")
    zip: Union[dict[str, list[Any]], list[dict[str, list[Any]]]] = Field(
        default_factory=list, description="dotted key -> values, lists of equal length varied together")
    seeds: Optional[list[int]] = Field(None, min_length=1, description="one run per seed (sets `seed`)")
    scales: dict[str, dict[str, Any]] = Field(default_factory=dict, description="named sizes of the same sweep, "
                                              "e.g. smoke: each replaces the listed top-level entries (overrides, "
                                              "grid, zip, seeds) and keeps the others")

    @model_validator(mode="after")
    def _lists(self) -> "SweepSpec":
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: an empty list gives no run")
        for group in self.zip_groups():
            lengths = {key: len(values) for key, values in group.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"zip: lists of one group must have equal lengths, got {lengths}")
        return self

    def zip_groups(self) -> list[dict[str, list[Any]]]:
        return [self.zip] if isinstance(self.zip, dict) else list(self.zip)


@dataclass
class SweepRun:
    """One run of a sweep: its config and the values the sweep chose for it."""

    config: ExperimentConfig
    label: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.config.run_id()


@dataclass
class SweepResult:
    """What a sweep call did: run ids by outcome (``skipped``: complete before the call)."""

    name: str
    runs: list[str]
    skipped: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
               scale: str | None = None) -> tuple[SweepSpec, list[SweepRun]]:
    """Read a sweep file and expand it; ``overrides`` (``key=value``) apply to every run. ``scale``
    names one of the file's ``scales``: its entries replace the file's (same graph, other sizes)."""
    path = Path(path)
    try:
        spec = SweepSpec(**read_yaml(path))
        if scale is not None:
            if scale not in spec.scales:
                known = ", ".join(spec.scales) or "none"
                raise KDBackdoorError(f"{path}: no scale {scale!r} (this sweep has: {known})")
            spec = SweepSpec(**{**spec.model_dump(exclude={"scales"}), **spec.scales[scale],
                                "name": f"{spec.name}-{scale}"})
    except ValidationError as exc:
        raise KDBackdoorError(f"{path}: {describe_errors(exc, SweepSpec)}") from None
    base = read_yaml(path.parent / spec.base) if spec.base else {}
    base = _merge(base, spec.config)
    base = apply_overrides(base, {**spec.overrides, **parse_overrides(overrides)})
    return spec, expand(spec, base, str(path))


def expand(spec: SweepSpec, base: dict, source: str = "sweep") -> list[SweepRun]:
    """Every run of the sweep, in a fixed order (grid, then zip groups, then seeds vary fastest).

    Runs whose configs are identical are kept once. Raises ``KDBackdoorError`` naming the run
    and key of the first invalid config.
    """
    axes: list[list[dict[str, Any]]] = [[{key: value} for value in values] for key, values in spec.grid.items()]
    for group in spec.zip_groups():
        keys = list(group)
        axes.append([dict(zip(keys, values)) for values in zip(*group.values())])
    if spec.seeds is not None:
        axes.append([{"seed": seed} for seed in spec.seeds])
    runs, seen = [], set()
    for choice in itertools.product(*axes):
        label = {key: value for part in choice for key, value in part.items()}
        described = ", ".join(f"{key}={value}" for key, value in label.items()) or "the base config"
        config = validate_config(apply_overrides(base, label), f"{source} (run {described})")
        if config.run_id() not in seen:
            seen.add(config.run_id())
            runs.append(SweepRun(config, label))
    return runs


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def run_sweep(
    spec: SweepSpec,
    runs: list[SweepRun],
    results: str | Path,
    *,
    jobs: int = 1,
    backend: Literal["local", "ray"] = "local",
    address: str | None = None,
    cpus_per_run: float = 1,
    gpus_per_run: float = 0,
    progress: bool = True,
    on_event: Callable[[str, str, str], None] | None = None,
) -> SweepResult:
    """Run the sweep's incomplete runs into ``results``; return what happened.

    ``jobs``: runs at once (local: worker processes, each with its share of the CPU threads;
    ray: a local instance's CPU count). ``address``: a Ray cluster to join (``auto`` or
    ``HOST:PORT``) instead of starting a local instance. ``cpus_per_run`` / ``gpus_per_run``:
    Ray resources per run (``gpus_per_run=1``: one GPU per run). ``on_event(kind, run_id,
    detail)`` is told of each start (``start``), skip, success (``done``) and failure
    (``failed``). A failed run does not stop the others.
    """
    if backend not in BACKENDS:
        raise KDBackdoorError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if jobs < 1:
        raise KDBackdoorError(f"jobs must be at least 1, got {jobs}")
    results = Path(results)
    for run in runs:
        preflight(run.config)
    started = time.perf_counter()
    outcome = SweepResult(spec.name, [run.run_id for run in runs])
    event = on_event or (lambda kind, run_id, detail: None)
    write_json(results / SWEEPS_DIR / f"{_safe(spec.name)}.json",
               {"name": spec.name, "runs": [{"run_id": run.run_id, "label": run.label} for run in runs]})
    todo = []
    for run in runs:
        folder = run_dir(results, run.config)
        if is_complete(folder):
            outcome.skipped.append(run.run_id)
            event("skip", run.run_id, "complete")
        else:
            todo.append(run)
    # complete runs are re-indexed from their records: a sweep killed after a run's record was
    # written but before the index was updated leaves the index right after the next call
    update_index(results, [record_row(read_record(run_dir(results, run.config)), f"{RUNS_DIR}/{run.run_id}")
                           for run in runs if run.run_id in outcome.skipped])
    jobs_list = [_Job(run.run_id, run.config.to_data(), run.label, spec.name, str(results))
                 for run in todo]

    def finished(job: _Job, error: str | None) -> None:
        run_id = job.run_id
        if error is None:
            stop_points.reached("sweep-run-finished")
            update_index(results, [record_row(read_record(results / RUNS_DIR / run_id), f"{RUNS_DIR}/{run_id}")])
            outcome.completed.append(run_id)
            event("done", run_id, "")
        else:
            update_index(results, [status_row(run_id, "failed", f"{RUNS_DIR}/{run_id}", job.config, sweep=spec.name,
                                              error=error)])
            outcome.failed[run_id] = error
            event("failed", run_id, error)

    def submitted(job: _Job) -> None:
        run_id = job.run_id
        update_index(results, [status_row(run_id, "running", f"{RUNS_DIR}/{run_id}", job.config, sweep=spec.name)])
        event("start", run_id, ", ".join(f"{k}={v}" for k, v in job.label.items()))

    if backend == "ray":
        _run_ray(jobs_list, jobs, address, cpus_per_run, gpus_per_run, submitted, finished)
    elif jobs == 1:
        for job in jobs_list:
            submitted(job)
            finished(job, execute_job(job, progress=progress))
    else:
        _run_pool(jobs_list, jobs, submitted, finished)
    outcome.seconds = time.perf_counter() - started
    return outcome


@dataclass
class _Job:
    """What a worker needs to run one run (plain data, so it pickles cheaply)."""

    run_id: str
    config: dict
    label: dict
    sweep: str
    results: str


def execute_job(job: _Job, progress: bool = False) -> str | None:
    """Run one job; return None on success, else the error (the traceback goes to the run's log)."""
    try:
        run_experiment(ExperimentConfig(**job.config), job.results, label=job.label, sweep=job.sweep,
                       progress=progress)
        return None
    except KDBackdoorError as exc:
        return str(exc)
    except Exception as exc:  # a crashed run must not stop the sweep; the run's log has the traceback
        first_line = (str(exc).splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first_line} (traceback in the run's log.txt)"


def _run_pool(jobs_list: list[_Job], jobs: int, submitted, finished) -> None:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=_worker_context(threads), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending = {}
        queue = list(jobs_list)
        while queue or pending:
            while queue and len(pending) < jobs:
                job = queue.pop(0)
                submitted(job)
                pending[pool.submit(execute_job, job)] = job
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                error = future.exception()
                finished(job, future.result() if error is None else f"worker died: {error}")


def _worker_context(threads: int) -> BaseContext:
    """How workers start; a fresh interpreter spends seconds importing torch, longer than a tiny run.

    On Linux with one torch thread per worker: fork, so a worker starts at once with what this
    process imported. (A forked child hangs only when it enters an OpenMP parallel region after
    the parent has used one; with one thread it never does. A CUDA context does not survive a
    fork, so not once this process has one.) Otherwise: from a fork server that imports the
    toolkit once, or spawned where there is none.
    """
    methods = get_all_start_methods()
    if threads == 1 and sys.platform == "linux" and "fork" in methods and not torch.cuda.is_initialized():
        return get_context("fork")
    if "forkserver" in methods:
        context = get_context("forkserver")
        context.set_forkserver_preload(["kdbackdoor.experiment.runner"])
        return context
    return get_context("spawn")


def _init_worker(threads: int) -> None:
    """A worker: its share of CPU threads, and an exit when the sweep process dies (even by SIGKILL)."""
    torch.set_num_threads(threads)
    parent = os.getppid()  # the sweep, or the fork server, which exits when the sweep dies

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _run_ray(jobs_list: list[_Job], jobs: int, address: str | None, cpus: float, gpus: float, submitted,
             finished) -> None:
    try:
        import ray
    except ImportError:
        raise KDBackdoorError("--backend ray needs Ray: pip install 'kdbackdoor[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, include_dashboard=False)
        else:
            ray.init(num_cpus=max(1, int(jobs * cpus)), include_dashboard=False)
    try:
        # a run whose node or worker process dies is resubmitted (it continues from its folder); errors the
        # run itself raises are not retried: they come back as its result
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=RAY_RETRIES)(_ray_job)
        pending = {}
        for job in jobs_list:
            submitted(job)
            pending[remote.remote(job, max(1, int(cpus)))] = job
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                error = ray.get(done[0])
            except Exception as exc:  # the worker process died (out of memory, node lost)
                error = f"worker died: {exc}"
            finished(job, error)
    finally:
        if started_here:
            ray.shutdown()


def _ray_job(job: _Job, threads: int) -> str | None:
    torch.set_num_threads(threads)
    return execute_job(job)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80]
