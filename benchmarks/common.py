"""Helpers shared by the benchmark scripts: where the shared data is, how results are written."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

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


def variant_suffix(out: str | Path | None, default: str | None) -> str:
    """"" when ``out`` is the benchmark's default output folder (or not given), else "_NAME" after
    the folder's name: a variant's results files must not replace the standard ones."""
    if out is None or str(out) == str(default):
        return ""
    return f"_{Path(out).name}"


def write_results(name: str, data: dict, markdown: str) -> None:
    """Write ``results/NAME.json`` and ``results/NAME.md`` and print the markdown."""
    from kdbackdoor.atomic import write_json
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", {"machine": machine(), "command": " ".join(sys.argv), **data})
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(markdown)


def training_images(count: int):
    """The first ``count`` (seeded shuffle) CIFAR-10 training images as an ``ImageDataset`` (uint8)
    when the shared data is there, else random uint8 images of the same shape (timing only)."""
    from kdbackdoor.data.dataset import ImageDataset
    data = _cifar10_train()
    if data is not None:
        if count >= len(data):
            return data
        return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count])
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageDataset(images, torch.arange(count) % 10, [str(i) for i in range(10)], "random")


@functools.lru_cache(maxsize=1)
def _cifar10_train():
    """The shared CIFAR-10 training split (decoded once per process), or None when it is not there."""
    folder = SHARED / "data" / "cifar10-jpeg"
    if not folder.is_dir():
        return None
    from kdbackdoor.data.sources import load_dataset
    return load_dataset(f"imagefolder:{folder}", "train", progress=False)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA kernels run asynchronously; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds (wall clock) that ``fn()`` takes, device work included."""
    device = device or torch.device("cpu")
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def interleaved(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call every measure once per round, in turn, for ``rounds`` rounds; return each one's values.

    Interleaving makes a noisy (shared) machine slow all measures alike, so that ratios of
    their medians stay fair even when absolute rates drift.
    """
    values: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            values[name].append(measure())
    return values


def medians(values: dict[str, list[float]]) -> dict[str, float]:
    """The median of each list."""
    return {name: statistics.median(v) for name, v in values.items()}


def top_ops(fn: Callable[[], object], rows: int = 10) -> list[dict]:
    """Run ``fn`` under ``torch.profiler``; the ``rows`` operators with the most self time.

    Each row: name, calls, self time (ms, CPU; plus device time when CUDA ran) and share of the
    total self time. Says where the time of a slow path goes.
    """
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    result = []
    for e in ranked:
        row = {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
               "share": e.self_cpu_time_total / total}
        device_time = getattr(e, "self_device_time_total", 0) or 0
        if device_time:
            row["self_device_ms"] = device_time / 1e3
        result.append(row)
    return result


def rss_bytes() -> tuple[int, int]:
    """(current resident set size, peak resident set size) of this process in bytes (Linux; 0s elsewhere)."""
    status = Path(f"/proc/{os.getpid()}/status")
    if not status.is_file():
        return 0, 0
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    kib = {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM") if key in fields}
    return kib.get("VmRSS", 0) * 1024, kib.get("VmHWM", 0) * 1024
