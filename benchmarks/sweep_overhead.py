"""Sweep overhead: 20 tiny runs back to back vs with --jobs 2, and resuming a finished sweep.

The 20 runs (digits, small-cnn student, 2 epochs on 600 images; λ × 5, student seed × 4)
share one teacher, which is trained beforehand in both results folders so that both timings
cover the same 20 students. Back to back: one process, one torch thread (what one run
costs on one core). Parallel: two worker processes with one thread each. Target: parallel
time ≤ 1.2 × (back-to-back time / 2). Then the finished sweep is called again: it must run
nothing. Writes results/sweep_overhead.{json,md}.

    python benchmarks/sweep_overhead.py [--out runs/bench-sweep-overhead]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from common import ROOT, write_results
from kdbackdoor.experiment.config import apply_overrides, validate_config
from kdbackdoor.experiment.runner import run_experiment
from kdbackdoor.experiment.sweep import SweepSpec, expand, run_sweep

FAST = {"epochs": 2, "batch_size": 64, "lr": 0.05, "crop_padding": 0, "hflip": False, "eval_every": 0}
BASE = {"name": "overhead", "data": {"dataset": "digits", "test_subset": 300},
        "teacher": {"train": {**FAST, "epochs": 5}, "seed": 0}, "distill": {"train": FAST, "subset": 600}}
SPEC = SweepSpec(name="overhead", grid={"distill.kd.kd_lambda": [0.0, 0.25, 0.5, 0.75, 1.0],
                                        "distill.seed": [0, 1, 2, 3]})
TARGET = 1.2


def timed_sweep(results: Path, jobs: int) -> tuple[float, object]:
    """Train the shared teacher (untimed), then time the sweep's 20 runs."""
    run_experiment(validate_config(apply_overrides(BASE, {"distill.kd.kd_lambda": 0.1})), results, progress=False)
    runs = expand(SPEC, BASE)
    started = time.perf_counter()
    outcome = run_sweep(SPEC, runs, results, jobs=jobs, progress=False)
    seconds = time.perf_counter() - started
    assert not outcome.failed and len(outcome.completed) == len(runs), outcome
    return seconds, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-sweep-overhead")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    torch.set_num_threads(1)
    sequential, runs = timed_sweep(args.out / "sequential", jobs=1)
    parallel, _ = timed_sweep(args.out / "parallel", jobs=2)
    started = time.perf_counter()
    again = run_sweep(SPEC, runs, args.out / "parallel", jobs=2, progress=False)
    resume_seconds = time.perf_counter() - started
    ratio = parallel / (sequential / 2)
    data = {"runs": len(runs), "sequential_s": sequential, "jobs2_s": parallel, "ratio": ratio, "target": TARGET,
            "resume": {"seconds": resume_seconds, "completed": len(again.completed), "skipped": len(again.skipped)}}
    verdict = "meets" if ratio <= TARGET else "misses"
    markdown = "\n".join([
        "## Sweep overhead (20 tiny digits runs)", "",
        "| | seconds |", "|---|---|",
        f"| back to back (1 process, 1 thread) | {sequential:.1f} |",
        f"| --jobs 2 (2 workers, 1 thread each) | {parallel:.1f} |",
        f"| resuming the finished sweep | {resume_seconds:.2f} ({len(again.completed)} runs done, "
        f"{len(again.skipped)} skipped) |", "",
        f"ratio jobs-2 / (back-to-back / 2) = {ratio:.2f}: {verdict} the target ≤ {TARGET}.",
    ])
    write_results("sweep_overhead", data, markdown)
    assert again.completed == [] and len(again.skipped) == len(runs), "resuming a finished sweep did work"


if __name__ == "__main__":
    main()
