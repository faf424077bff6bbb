"""Write the generated blocks of docs/performance.md from benchmarks/results/: the CPU precision
and layout figures (cpu_precision.json) and the GPU figures (gpu.json), or, while a file is not
there, the command that makes it and the statement that nothing was measured.

    python benchmarks/performance_page.py           # rewrite what is out of date
    python benchmarks/performance_page.py --check   # exit 1 if the page is out of date (a test runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pages import RESULTS, ROOT, Page, load, main, replace_block, stale  # noqa: E402, F401

PAGE = ROOT / "docs" / "performance.md"
GPU_COMMAND = "PYTHONPATH=src python3 benchmarks/gpu.py --budget 330"
CPU_COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_precision.py"


def _measured(name: str, command: str) -> str:
    machine = load(name).get("machine", {})
    where = machine.get("cuda") or f"CPU ({machine.get('cpu', '?')}, {machine.get('threads', '?')} torch thread(s))"
    return (f"Measured {machine.get('date', '?')} on {where}, torch {machine.get('torch', '?')}, with "
            f"`{load(name).get('command') or command}` "
            f"([json](../benchmarks/results/{name}.json)).")


def cpu_block() -> str:
    if not (RESULTS / "cpu_precision.json").exists():
        return f"Not measured yet: `{CPU_COMMAND}` writes `benchmarks/results/cpu_precision.json`."
    return _measured("cpu_precision", CPU_COMMAND) + "\n\n" + (RESULTS / "cpu_precision.md").read_text()


def gpu_block() -> str:
    if not (RESULTS / "gpu.json").exists():
        return ("**Prepared command; not measured.** No GPU figure of these code paths has been measured: from "
                f"the repository root on a CUDA machine, with CIFAR-10 at `../shared/data/cifar10-jpeg`:\n\n"
                f"```\n{GPU_COMMAND}\n```\n\nIt finishes within its `--budget` (seconds; a watchdog writes "
                "what was measured and ends the process 45 s past it) and writes `benchmarks/results/gpu.json` "
                "and `gpu.md`, naming the device and the torch version.")
    return _measured("gpu", GPU_COMMAND) + "\n\n" + (RESULTS / "gpu.md").read_text()


def render(text: str) -> str:
    return replace_block(replace_block(text, "cpu-precision", cpu_block()), "gpu", gpu_block())


PAGES = [Page(PAGE, render)]

if __name__ == "__main__":
    raise SystemExit(main(PAGES))
