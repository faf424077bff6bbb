"""Reproduce both papers' claims at a fixed budget, at several seeds: a grid of independent rows.

Rows (see reproduction_grid.py): the shared teachers; the poisoned-distillation-set attack
(arXiv 2504.21323) over λ, engine, poison labels and trigger size; ZSKT, ZSKT + ABD and
clean-data KD from BadNets-grid, Trojan-WM and Blend teachers (ABD, ICML 2023); and ablations of
ABD's knobs and of the ZSKT budget. Each row writes WORK/rows/ROW.json (metrics, the command, the
device, torch version, seed) when it finishes.

- Resumable: finished rows are skipped, unfinished ones continue from their checkpoints.
- Parallel: --jobs K runs K rows at once in separate processes on the one device, each with
  --threads CPU threads (default: the cores shared out).
- Deadline: --deadline-s stops the grid that many seconds after start; rows not finished by
  then are stopped (their checkpoints stay), finished ones are intact.
- --bundle FILE collects every finished row of WORK into one JSON file, rewritten after each row
  (one file to carry results off a machine); docs/reproduction.md is generated from such bundles
  (benchmarks/reproduction_doc.py).

Scales: `smoke` (digits, seconds on a CPU; exercised by the tests) and `cpu` (CIFAR-10 at the
budgets the docs call CPU scale; runs on any device, hours on a 2-core CPU, minutes on a GPU).

  python benchmarks/reproduction.py --scale cpu --list
  python benchmarks/reproduction.py --scale cpu --jobs 12 --deadline-s 420 \\
      --bundle benchmarks/results/reproduction_cpu.json
  python benchmarks/reproduction.py --scale cpu --rows 'attack-pgd-px4-*-lam0.5-seed0'
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
import time
from pathlib import Path

from common import machine
from kdbackdoor.atomic import write_json
from reproduction_grid import SCALES, Row, grid, select
from reproduction_rows import ROWS_DIR, RowContext, finished_row, run_row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=list(SCALES), default="smoke")
    parser.add_argument("--rows", nargs="+", default=None, help="shell-style patterns of row ids (default: all)")
    parser.add_argument("--work", type=Path, default=None, help="artifacts, checkpoints and row results "
                        "(default: runs/reproduction-SCALE)")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding cifar10-jpeg/ "
                        "(default: ../shared/data beside the checkout)")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, one process each")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / jobs)")
    parser.add_argument("--deadline-s", type=float, default=None, help="stop this many seconds after start")
    parser.add_argument("--bundle", type=Path, default=None, help="write every finished row into this JSON file")
    parser.add_argument("--list", action="store_true", help="print the rows in run order and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    started = time.monotonic()
    command = "python benchmarks/reproduction.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    work = args.work or Path("runs") / f"reproduction-{args.scale}"
    # decoded data beside the work, so that a machine kept between calls decodes it once (workers inherit it)
    os.environ.setdefault("KDBACKDOOR_CACHE", str(work / "cache"))
    rows = select(grid(args.scale), args.rows)
    if args.list:
        for row in rows:
            done = "done" if finished_row(work, row.id) else ""
            print(f"{row.id:70s} cost {row.cost:5.1f} {done}")
        return 0
    todo = [row for row in rows if not finished_row(work, row.id)]
    print(f"{len(rows) - len(todo)} of {len(rows)} rows already finished; running {len(todo)} "
          f"with {args.jobs} job(s)", flush=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    options = (args.scale, str(work), str(args.data_dir) if args.data_dir else None, threads, command)
    deadline = started + args.deadline_s if args.deadline_s is not None else None
    if todo and (deadline is None or time.monotonic() < deadline):
        if args.jobs == 1:
            _run_here(todo, options, deadline, args.bundle, work, args.scale)
        else:
            _prepare_data(options)
            _run_pool(todo, options, args.jobs, deadline, args.bundle, work, args.scale)
    if args.bundle:
        bundle(work, args.bundle, args.scale, command)
    left = [row.id for row in rows if not finished_row(work, row.id)]
    print(f"{len(rows) - len(left)} of {len(rows)} rows finished" + (f"; left: {len(left)}" if left else ""))
    return 0


_CONTEXT: RowContext | None = None


def _init_worker(scale: str, work: str, data_dir: str | None, threads: int, command: str) -> None:
    import torch
    global _CONTEXT
    torch.set_num_threads(threads)
    _CONTEXT = RowContext(scale, Path(work), Path(data_dir) if data_dir else None)
    _CONTEXT.command = command


def _work(row: Row) -> tuple[str, float, dict | str]:
    """(row id, seconds, metrics), or an error message in place of the metrics: one failing row
    does not stop the others."""
    started = time.perf_counter()
    try:
        result = run_row(row, _CONTEXT, command=_CONTEXT.command)
    except Exception as error:  # noqa: BLE001 - reported, and the row stays unfinished
        return row.id, time.perf_counter() - started, f"FAILED: {type(error).__name__}: {error}"
    return row.id, result["seconds"], result["metrics"]


def _prepare_data(options: tuple) -> None:
    """Decode the data set once here so that the workers read it from the cache."""
    scale, work, data_dir = options[:3]
    context = RowContext(scale, Path(work), Path(data_dir) if data_dir else None)
    context.train, context.full_test  # noqa: B018 - loading fills the decoded-data cache


def _report(row_id: str, seconds: float, metrics: dict | str) -> None:
    shown = metrics if isinstance(metrics, str) else " ".join(f"{k} {v:.1%}" for k, v in metrics.items())
    print(f"{row_id}: {shown} ({seconds:.0f} s)", flush=True)


def _run_here(todo: list[Row], options: tuple, deadline: float | None, bundle_path, work, scale) -> None:
    """One row at a time in this process; the deadline is checked between rows."""
    _init_worker(*options)
    for row in todo:
        if deadline is not None and time.monotonic() >= deadline:
            print("deadline reached", flush=True)
            return
        _report(*_work(row))
        if bundle_path:
            bundle(work, bundle_path, scale, options[-1])


def _run_pool(todo: list[Row], options: tuple, jobs: int, deadline: float | None, bundle_path, work, scale) -> None:
    """``jobs`` worker processes take rows in grid order; at the deadline unfinished rows are stopped."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # spawned workers import this module by name, with the path they are given
        sys.path.append(here)
    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_init_worker, initargs=options)
    results = pool.imap_unordered(_work, todo, chunksize=1)
    try:
        for _ in todo:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                _report(*results.next(timeout=wait))
            except multiprocessing.TimeoutError:
                print("deadline reached: stopping unfinished rows (their checkpoints stay)", flush=True)
                return
            if bundle_path:
                bundle(work, bundle_path, scale, options[-1])
    finally:
        pool.terminate()
        pool.join()


def bundle(work: Path, path: Path, scale: str, command: str) -> dict:
    """Write every finished row result of ``work`` into the JSON file ``path``; return it."""
    rows = {}
    for file in sorted((Path(work) / ROWS_DIR).glob("*.json")):
        result = finished_row(work, file.stem)
        rows[result["row"]] = result
    data = {"machine": machine(), "command": command, "scale": scale, "rows": rows}
    write_json(path, data)
    return data


if __name__ == "__main__":
    sys.exit(main())
