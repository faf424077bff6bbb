"""``kdbackdoor matrix``: attacks × KD methods × defenses × seeds, and its leaderboard."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from kdbackdoor.cli.app import RUNTIME_OVERRIDES, app, console
from kdbackdoor.cli.options import OVERRIDES, PROGRESS, RESULTS


@app.command("matrix")
def matrix_cmd(
    matrix: Path = typer.Argument(..., help="matrix file (YAML): base config, attacks, methods, defenses, seeds "
                                  "(see configs/matrix/)"),
    overrides: Optional[list[str]] = OVERRIDES,
    results: Path = RESULTS,
    jobs: int = typer.Option(1, min=1, help="runs at once (local: worker processes; ray: CPUs of a local instance)"),
    backend: str = typer.Option("local", help="local | ray (pip install 'kdbackdoor\\[ray]')"),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (auto or HOST:PORT)"),
    cpus_per_run: float = typer.Option(1.0, help="Ray: CPUs reserved per run"),
    gpus_per_run: float = typer.Option(0.0, help="Ray: GPUs reserved per run"),
    dry_run: bool = typer.Option(False, help="validate and list the cells, run nothing"),
    leaderboard_only: bool = typer.Option(False, help="only (re)write the leaderboard from the complete runs"),
    progress: bool = PROGRESS,
) -> None:
    """Run every attack × KD method × defense × seed cell as one sweep (resumable: complete runs
    are skipped, so calling it again continues), then write RESULTS/leaderboard.{md,html,json}:
    per cell student ACC, ASR, target-without-trigger, transfer ratio (student ASR / teacher
    ASR) and the defense's ACC cost, mean ± std over seeds, with each attack's best defense.
    Cells whose defense does not apply to their method are listed and left out."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from kdbackdoor.experiment.leaderboard import write_leaderboard
    from kdbackdoor.experiment.matrix import load_matrix
    from kdbackdoor.experiment.runner import is_complete, preflight, run_dir
    from kdbackdoor.experiment.sweep import run_sweep

    loaded = load_matrix(matrix, [*RUNTIME_OVERRIDES, *(overrides or [])])
    for note in loaded.skipped:
        console.print(f"left out: {note}", highlight=False)
    if dry_run:
        for run in loaded.runs:
            preflight(run.config)
            state = "complete" if is_complete(run_dir(results, run.config)) else "to run"
            label = " × ".join(str(run.label[k]) for k in ("attack", "method", "defense")) + f" seed {run.label['seed']}"
            console.print(f"{run.run_id}  {state:<8}  {label}", highlight=False)
        console.print(f"{len(loaded.runs)} runs, all valid")
        return
    failed = 0
    if not leaderboard_only:
        columns = [TextColumn(f"[bold]matrix {loaded.spec.name}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=console, disable=not progress) as bar:
            task = bar.add_task("matrix", total=len(loaded.runs))

            def on_event(kind: str, run_id: str, detail: str) -> None:
                if kind == "failed":
                    bar.console.print(f"[bold red]failed[/] {run_id}: {detail}", highlight=False)
                if kind != "start":
                    bar.advance(task)
            result = run_sweep(loaded.sweep_spec(), loaded.runs, results, jobs=jobs, backend=backend,
                               address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                               progress=False, on_event=on_event)
        failed = len(result.failed)
        console.print(f"{len(result.completed)} runs completed, {len(result.skipped)} already complete, "
                      f"{failed} failed in {result.seconds:.1f} s")
    command = " ".join(shlex.quote(str(part)) for part in ["kdbackdoor", "matrix", matrix, *(overrides or []),
                                                            "--results", results])
    paths = write_leaderboard(loaded, results, command)
    console.print(f"leaderboard → {paths['md']}, {paths['html']}")
    if failed:
        raise typer.Exit(1)
