"""Experiments: typed configs, cached stages, runs, sweeps (local or Ray), the run index, reports.

Library use (what the CLI commands `run`, `sweep` and `report` call)::

    from kdbackdoor.experiment import load_config, run_experiment, load_sweep, run_sweep, write_report

    config = load_config("configs/attack/base-cpu.yaml", ["distill.kd.kd_lambda=1"])
    record = run_experiment(config, "runs/results")          # RESULTS/runs/<run_id>/metrics.json
    spec, runs = load_sweep("configs/attack/lambda-cpu.yaml")
    run_sweep(spec, runs, "runs/results", jobs=2)
    write_report(["runs/results"], "runs/results/report.html")
"""

from kdbackdoor.experiment.config import ExperimentConfig, load_config, validate_config
from kdbackdoor.experiment.report import write_report
from kdbackdoor.experiment.runner import run_experiment
from kdbackdoor.experiment.sweep import SweepResult, load_sweep, run_sweep

__all__ = ["ExperimentConfig", "SweepResult", "load_config", "load_sweep", "run_experiment", "run_sweep",
           "validate_config", "write_report"]
