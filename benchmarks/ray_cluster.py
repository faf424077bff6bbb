"""A sweep on a real two-node Ray cluster on this machine, with the worker node killed mid-sweep.

A head node and a worker node are started as separate ``ray start`` processes (one CPU each,
each its own raylet, object store and worker processes); ``kdbackdoor sweep --backend ray
--address`` joins the cluster as a driver. Once both nodes run a run, the worker node's raylet
is killed (SIGKILL, as a lost machine). The sweep must finish on the head node alone, with every
run complete and recorded exactly once in the index, the interrupted run continued from its
folder.

Usage: python benchmarks/ray_cluster.py [--runs 4]   (about 3 minutes on 2 cores)
Writes results/ray_cluster.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

RAY = Path(sys.executable).with_name("ray")
SWEEP = """name: ray-cluster
config:
  name: ray-cluster
  data: {{dataset: digits, test_subset: 200}}
  teacher:
    arch: small-cnn
    train: {{epochs: 2, batch_size: 64, lr: 0.05, crop_padding: 0, hflip: false, eval_every: 0}}
  distill:
    student_arch: small-cnn
    train: {{epochs: {epochs}, batch_size: 32, lr: 0.05, crop_padding: 0, hflip: false, eval_every: 0}}
grid:
  distill.kd.kd_lambda: {lambdas}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command_lines() -> dict[int, str]:
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return lines


def _raylet_pids(node_manager_port: int) -> list[int]:
    """Pids of the raylet serving ``node_manager_port`` (its command line names the port)."""
    return [pid for pid, cmd in _command_lines().items()
            if "raylet" in cmd.split(" ")[0] and f"--node_manager_port={node_manager_port}" in cmd]


def _pids_naming(*needles: str) -> list[int]:
    return [pid for pid, cmd in _command_lines().items() if any(needle in cmd for needle in needles)]


def _started_runs(results: Path) -> int:
    return sum(1 for log in results.glob("runs/*/log.txt") if " started" in log.read_text())


def cluster_sweep(folder: Path, runs: int = 4, epochs: int = 30, timeout: float = 900.0) -> dict:
    """Run the experiment in ``folder``; return what happened (see the module docstring)."""
    # token authentication (on by default for clusters started by `ray start`): every process of the
    # cluster, the driver included, reads the token from ~/.ray/auth_token
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    port, worker_port = _free_port(), _free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats",
              "--node-ip-address=127.0.0.1"]
    start = [[str(RAY), "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
              *common],
             [str(RAY), "start", f"--address=127.0.0.1:{port}", f"--node-manager-port={worker_port}", *common]]
    results = folder / "results"
    sweep = folder / "sweep.yaml"
    sweep.write_text(SWEEP.format(epochs=epochs, lambdas=[round(i / max(1, runs - 1), 3) for i in range(runs)]))
    outcome: dict = {"runs": runs, "nodes": 2, "cpus_per_node": 1}
    try:
        for command in start:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
        started = time.perf_counter()
        driver = subprocess.Popen([sys.executable, "-m", "kdbackdoor.cli", "sweep", str(sweep), "--results",
                                   str(results), "--backend", "ray", "--address", f"127.0.0.1:{port}",
                                   "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        while _started_runs(results) < 2 and driver.poll() is None:  # both nodes busy
            if time.perf_counter() - started > timeout:
                raise TimeoutError("the two nodes never ran two runs at once")
            time.sleep(0.5)
        pids = _raylet_pids(worker_port)
        outcome["killed_worker_raylet_pids"] = pids
        outcome["runs_started_when_killed"] = _started_runs(results)
        outcome["seconds_when_killed"] = time.perf_counter() - started
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        output, _ = driver.communicate(timeout=timeout)
        outcome["driver_exit_code"] = driver.returncode
        outcome["driver_output_tail"] = output[-1500:]
        outcome["seconds"] = time.perf_counter() - started
    finally:  # this cluster's processes only (their command lines name its session folder or port)
        for pid in _pids_naming(str(temp), f"127.0.0.1:{port}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from kdbackdoor.experiment.index import read_index
    from kdbackdoor.experiment.runner import is_complete
    rows = read_index(results)
    outcome["index_rows"] = len(rows)
    outcome["index_run_ids_unique"] = len({row["run_id"] for row in rows}) == len(rows)
    outcome["index_complete"] = sum(row["status"] == "complete" for row in rows)
    folders = [path for path in (results / "runs").iterdir() if path.is_dir()]
    outcome["run_folders_complete"] = sum(is_complete(path) for path in folders)
    outcome["runs_started_twice"] = sum((path / "log.txt").read_text().count(" started") > 1 for path in folders)
    return outcome


def markdown(r: dict) -> str:
    return "\n".join([
        f"Two Ray nodes on one machine (`ray start --head` and `ray start --address`, {r['cpus_per_node']} CPU each), "
        f"a sweep of {r['runs']} runs joined as a driver (`--backend ray --address`). The worker node's raylet was "
        f"killed (SIGKILL) {r['seconds_when_killed']:.0f} s in, with {r['runs_started_when_killed']} runs started.", "",
        "| outcome | value |", "|---|---|",
        f"| sweep exit code | {r['driver_exit_code']} |",
        f"| index rows / distinct run ids / complete | {r['index_rows']} / "
        f"{r['index_rows'] if r['index_run_ids_unique'] else 'duplicates!'} / {r['index_complete']} |",
        f"| run folders complete | {r['run_folders_complete']} of {r['runs']} |",
        f"| runs started twice (resubmitted after the node died) | {r['runs_started_twice']} |",
        f"| seconds | {r['seconds']:.0f} |"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30, help="student epochs per run (long enough to be killed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        result = cluster_sweep(Path(folder), args.runs, args.epochs)
    write_results("ray_cluster", result, markdown(result))


if __name__ == "__main__":
    main()
