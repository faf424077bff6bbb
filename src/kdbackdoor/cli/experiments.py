"""Experiments from configs (``kdbackdoor run``, ``sweep``, ``report``) and the end-to-end ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kdbackdoor.cli.app import RUNTIME_OVERRIDES, app, console
from kdbackdoor.cli.options import DEVICE, OVERRIDES, PROGRESS, RESULTS
from kdbackdoor.cli.summaries import run_summary


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="experiment config (YAML), e.g. configs/attack/base-cpu.yaml"),
    overrides: Optional[list[str]] = OVERRIDES,
    results: Path = RESULTS,
    dry_run: bool = typer.Option(False, help="validate, print the resolved config and the run folder, run nothing"),
    progress: bool = PROGRESS,
) -> None:
    """Run one experiment described by a config: teacher, optional poisoned distillation set,
    student, evaluation.

    Every option of train-teacher, poison-distill and distill has a config key (see
    docs/experiments.md). The config is validated before any work; teachers and poisoned
    sets are cached in RESULTS/cache by the hash of their settings, so a second run with
    the same teacher settings reuses it. A finished run is not run again; an interrupted
    one continues. The run's folder holds config.yaml, log.txt, metrics.json, student/
    and pictures; RESULTS/index.csv gets a row.
    """
    import yaml
    from kdbackdoor.experiment.config import load_config
    from kdbackdoor.experiment.index import record_row, update_index
    from kdbackdoor.experiment.runner import RUNS_DIR, preflight, run_dir, run_experiment

    experiment = load_config(config, [*RUNTIME_OVERRIDES, *(overrides or [])])
    folder = run_dir(results, experiment)
    if dry_run:
        preflight(experiment)
        console.print(yaml.safe_dump(experiment.to_data(), sort_keys=False), highlight=False)
        console.print(f"valid; the run would go to {folder}")
        return
    record = run_experiment(experiment, results, progress=progress)
    update_index(results, [record_row(record, f"{RUNS_DIR}/{record['run_id']}")])
    reused = [name for name, stage in record["stages"].items() if stage["cached"]]
    console.print(run_summary({"metrics": record["metrics"], "teacher_metrics": record["teacher_metrics"],
                                "baseline": {"metrics": record["baseline_metrics"]}
                                if record.get("baseline_metrics") else None}))
    console.print(f"reused from the cache: {', '.join(reused) or 'nothing'}\n→ {folder}")


@app.command("sweep")
def sweep_cmd(
    sweep: Path = typer.Argument(..., help="sweep file (YAML): base config, grid, zip, seeds"),
    overrides: Optional[list[str]] = OVERRIDES,
    results: Path = RESULTS,
    jobs: int = typer.Option(1, min=1, help="runs at once (local: worker processes sharing the CPU cores; "
                             "ray: CPUs of a local Ray instance)"),
    backend: str = typer.Option("local", help="local | ray (pip install 'kdbackdoor\\[ray]')"),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (auto or HOST:PORT; default: start a "
                                          "local instance)"),
    cpus_per_run: float = typer.Option(1.0, help="Ray: CPUs reserved per run"),
    gpus_per_run: float = typer.Option(0.0, help="Ray: GPUs reserved per run (1: one GPU per run)"),
    scale: Optional[str] = typer.Option(None, help="one of the sweep file's named scales (e.g. smoke: the same "
                                        "graph at minutes-on-a-CPU sizes); default: the file as written"),
    dry_run: bool = typer.Option(False, help="validate and list the runs, run nothing"),
    progress: bool = PROGRESS,
) -> None:
    """Run a grid of experiments; skip complete runs, re-run failed or interrupted ones.

    Expands the grid (every combination), zipped lists (varied together) and seeds over
    the base config, validates every run first, then runs what is not complete into
    RESULTS/runs/ and keeps RESULTS/index.csv up to date. Calling it again after a crash
    or a kill continues the sweep; a finished sweep does no work. Exit code 1 when a run
    failed (the others still ran; see the index's error column and the run's log.txt).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from kdbackdoor.experiment.runner import is_complete, preflight, run_dir
    from kdbackdoor.experiment.sweep import load_sweep, run_sweep

    spec, runs = load_sweep(sweep, [*RUNTIME_OVERRIDES, *(overrides or [])], scale)
    if dry_run:
        for run in runs:
            preflight(run.config)
            state = "complete" if is_complete(run_dir(results, run.config)) else "to run"
            label = ", ".join(f"{key}={value}" for key, value in run.label.items()) or "(base config)"
            console.print(f"{run.run_id}  {state:<8}  {label}", highlight=False)
        console.print(f"{len(runs)} runs, all valid")
        return
    columns = [TextColumn(f"[bold]sweep {spec.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("sweep", total=len(runs))

        def on_event(kind: str, run_id: str, detail: str) -> None:
            if kind == "start":
                bar.console.print(f"start {run_id}: {detail}", highlight=False)
            elif kind == "failed":
                bar.console.print(f"[bold red]failed[/] {run_id}: {detail}", highlight=False)
            if kind != "start":
                bar.advance(task)
        result = run_sweep(spec, runs, results, jobs=jobs, backend=backend, address=address,
                           cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, progress=False, on_event=on_event)
    console.print(f"{len(result.completed)} runs completed, {len(result.skipped)} already complete, "
                  f"{len(result.failed)} failed in {result.seconds:.1f} s; index: {results / 'index.csv'}")
    if result.failed:
        raise typer.Exit(1)


@app.command("report")
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="results folders (with index.csv), index.csv files or run folders"),
    out: Path = typer.Option(Path("report.html"), help="report file (.html: one self-contained page; .md: "
                             "Markdown with its pictures in <name>_files/)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="html | md (default: from the --out suffix)"),
) -> None:
    """Tables (mean ± std over seeds, in the papers' layouts), plots and image grids of complete runs.

    Tables: every condition; ABD's layout (teacher trigger × method, with and without the
    defense) for backdoored teachers distilled without data; the attack's ASR/ACC vs λ,
    manipulation method, poison rate and trigger when they vary. Plots: ASR vs λ, ACC vs ASR.
    Pictures: triggers, poisons beside their clean sources, synthetic samples.
    """
    from kdbackdoor.experiment.report import write_report
    console.print(f"report → {write_report(runs, out, fmt)}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="output folder (replaced if it holds an earlier demo)"),
    dataset: str = typer.Option("digits", help="digits (embedded, a few minutes on a CPU), or cifar10 / any "
                                "32x32 RGB data set spec for the same demo at CPU scale on real data (hours on a "
                                "2-core CPU)"),
    data_dir: Optional[Path] = typer.Option(None, help="where the cifar10 archives are (else downloaded)"),
    device: str = DEVICE,
    config: Optional[Path] = typer.Option(None, help="a sweep file of the demo's shape to run instead of the "
                                          "packaged one (configs/demo/digits.yaml, cifar10.yaml)"),
    progress: bool = PROGRESS,
) -> None:
    """End-to-end demo: the distillation-set attack against a clean teacher, data-free KD of a
    backdoored teacher with and without ABD, a filter audit; prints a table and writes an HTML report."""
    from kdbackdoor.demo import run_demo
    run_demo(out, dataset=dataset, data_dir=str(data_dir) if data_dir else None, device=device, config=config,
             progress=progress, console=console)
