"""Helpers shared by the benchmark scripts: where the shared data is, how results are written."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(name: str, data: dict, markdown: str) -> None:
    """Write ``results/NAME.json`` and ``results/NAME.md`` and print the markdown."""
    from kdbackdoor.atomic import write_json
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", {"machine": machine(), "command": " ".join(sys.argv), **data})
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
