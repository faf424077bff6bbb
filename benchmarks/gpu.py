"""One-call GPU benchmark of kdbackdoor's hot paths, sized for about six minutes on one H200.

Sections, in order (each skipped with a note when the budget is spent; results are written
after every section, so even a killed call leaves what it measured):

1. precision: bare training-step images/s of WRN-16-2, WRN-16-1 and ResNet-18 in fp32 NCHW,
   fp32 channels-last and bf16 channels-last (interleaved rounds, medians);
2. hot paths against their bare compute in bf16 + channels-last and in fp32: dataset-KD epoch
   (WRN-16-2 -> WRN-16-1, crop+flip, and with cached teacher logits), PGD crafting (image-steps/s,
   trigger + verification) and evaluation;
3. ZSKT iteration seconds, WRN-16-2 -> WRN-16-1 at ABD's settings (128 images, 1 generator step +
   10 student steps, attention transfer), plain, with the Shuffling Vaccine, and in ABD's
   Self-Retrospection phase; the student step against a bare KD step;
4. packed runs: total images/s of 1 and 4 processes training at once on the device;
5. a BadNets-grid WRN-16-2 teacher (10% poisons, target 0) on CIFAR-10: seconds to >= 92% ACC;
6. quality: teacher and dataset-KD student ACC/ASR in bf16 against fp32 (same seeds and data);
7. torch.compile of a WRN-16-2 training step against eager (compilation seconds apart);
8. projections of every kit in configs/paper/ from the step times measured above.

Writes ``benchmarks/results/gpu[_NAME].{json,md}`` naming the device and torch version.
CIFAR-10 comes from ``../shared/data/cifar10-jpeg`` (random images when it is absent: timings
only, no accuracy sections). ``--smoke``: CPU-sized, seconds (the test suite runs it).

Usage: python benchmarks/gpu.py [--budget 360] [--smoke] [--device auto] [--name NAME]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

import gpu_projection
import gpu_workloads as w
from common import RESULTS, SHARED, machine
from kdbackdoor.atomic import write_json
from kdbackdoor.numerics import Numerics, bf16_native, use_numerics
from kdbackdoor.runtime import select_device, set_cpu_threads

FULL = dict(archs=[("wrn-16-2", 512), ("wrn-16-1", 512), ("resnet18", 256)], steps=30, rounds=3, kd_images=20000,
            batch=512, pgd_poisons=2048, pgd_steps=20, zskt_batch=128, zskt_student_steps=10, zskt_iterations=5,
            packed=[1, 4], packed_seconds=12.0, teacher_epochs=35, teacher_batch=512, teacher_lr=0.4,
            quality_teacher_epochs=6, quality_student_epochs=3, compile_arch=("wrn-16-2", 512), test_images=10000)
SMOKE = dict(archs=[("small-cnn", 16)], steps=2, rounds=1, kd_images=64, batch=16, pgd_poisons=8, pgd_steps=2,
             zskt_batch=8, zskt_student_steps=2, zskt_iterations=1, packed=[1, 2], packed_seconds=0.5,
             teacher_epochs=1, teacher_batch=32, teacher_lr=0.05, quality_teacher_epochs=1,
             quality_student_epochs=1, compile_arch=None, test_images=64)
# share of the whole budget each section may use at most (the rest of a section's share is not
# carried over: a section ends early, the next one starts early)
SHARES = {"precision": 0.07, "hot_paths_bf16": 0.09, "hot_paths_fp32": 0.07, "zskt": 0.07, "packed": 0.10,
          "teacher": 0.42, "quality": 0.25, "compile": 0.12}
MODELS_SMOKE = {"teacher": "small-cnn", "student": "small-cnn"}
MODELS_FULL = {"teacher": "wrn-16-2", "student": "wrn-16-1"}


def load_cifar10(limit_train: int | None, limit_test: int | None):
    """(train, test) of the shared CIFAR-10 JPEG copy, or None when it is not there."""
    folder = SHARED / "data" / "cifar10-jpeg"
    if not folder.is_dir():
        return None
    from kdbackdoor.data.sources import load_dataset
    train = load_dataset(f"imagefolder:{folder}", "train", progress=False)
    test = load_dataset(f"imagefolder:{folder}", "test", progress=False)
    return seeded_subset(train, limit_train), seeded_subset(test, limit_test)


def seeded_subset(data, count: int | None):
    """``count`` rows drawn with seed 0 (all classes: image folders list their classes in order)."""
    if not count or count >= len(data):
        return data
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count])


def random_images(count: int):
    from kdbackdoor.data.dataset import ImageDataset
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.arange(count) % 10, [str(i) for i in range(10)], "random")


class Report:
    """Results so far; written to disk after every section (and by the watchdog)."""

    def __init__(self, name: str, budget: float, device: torch.device, argv: list[str], folder: Path) -> None:
        self.name, self.folder, self.started = name, folder, time.monotonic()
        self.lock = threading.Lock()
        self.data: dict = {"budget_seconds": budget, "device": str(device), "device_name": _device_name(device),
                           "torch": torch.__version__, "bf16_native": bf16_native(device),
                           "command": "python benchmarks/gpu.py " + " ".join(argv), "sections": {}, "skipped": {}}

    def write(self, status: str) -> None:
        with self.lock:
            self.data["status"], self.data["seconds"] = status, time.monotonic() - self.started
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / f"{self.name}.json", {"machine": machine(), **self.data})
            (self.folder / f"{self.name}.md").write_text(gpu_projection.markdown(self.data) + "\n")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace, argv: list[str]) -> Report:
    device = select_device(args.device)
    sizes = SMOKE if args.smoke else FULL
    models = MODELS_SMOKE if args.smoke else MODELS_FULL
    report = Report(args.name, args.budget, device, argv, Path(args.results))
    watchdog = threading.Timer(args.budget + args.grace, _overrun, args=(report,))
    watchdog.daemon = True
    watchdog.start()
    end = time.monotonic() + args.budget

    def section(name: str, fn) -> None:
        left = end - time.monotonic()
        share = SHARES[name] * args.budget
        if left < min(share, 5.0):
            report.data["skipped"][name] = f"not run: {left:.0f} s of the budget left"
            print(f"[{name}] skipped ({left:.0f} s left)", flush=True)
            return
        print(f"[{name}] up to {min(share, left):.0f} s", flush=True)
        started = time.monotonic()
        try:
            report.data["sections"][name] = {**fn(w.Deadline(min(share, left))),
                                             "section_seconds": time.monotonic() - started}
        except w.OutOfTime:
            report.data["skipped"][name] = f"stopped: its {min(share, left):.0f} s were spent before it finished"
        except Exception as exc:  # one failing section must not lose the others' numbers
            report.data["skipped"][name] = f"failed: {type(exc).__name__}: {exc}"
            traceback.print_exc()
        report.write("running")

    loaded = load_cifar10(sizes["kd_images"] if args.smoke else None, sizes["test_images"]) \
        if not args.smoke or args.real_data else None
    train, test = loaded if loaded else (random_images(max(sizes["kd_images"], 256)), random_images(256))
    report.data["data"] = {"name": train.name, "train_images": len(train), "test_images": len(test),
                           "real": loaded is not None}
    auto = Numerics("auto")
    section("precision", lambda d: {"archs": w.precision_table(sizes["archs"], sizes["steps"], sizes["rounds"],
                                                                 device, d)})
    for precision in ("bf16",) if args.smoke else ("bf16", "fp32"):  # smoke: the same code once
        def hot(d, p=precision):
            with use_numerics(Numerics(p)):
                return w.hot_paths(models["teacher"], models["student"], train, sizes["kd_images"], sizes["batch"],
                                   sizes["pgd_poisons"], sizes["pgd_steps"], sizes["rounds"], device, d)
        section(f"hot_paths_{precision}", hot)
    if args.smoke:
        report.data["skipped"]["hot_paths_fp32"] = "not run at smoke size (the bf16 section runs the same code)"
    with use_numerics(auto):
        section("zskt", lambda d: w.zskt_iterations(models["teacher"], models["student"], sizes["zskt_batch"],
                                                    sizes["zskt_student_steps"], sizes["zskt_iterations"], device, d))
        section("packed", lambda d: w.packed_runs(sizes["packed"], models["student"], models["teacher"],
                                                  sizes["zskt_batch"], sizes["packed_seconds"], "auto", d))
        if loaded is not None or args.smoke:
            section("teacher", lambda d: w.teacher_to_accuracy(
                train, test, models["teacher"], sizes["teacher_epochs"], sizes["teacher_batch"], sizes["teacher_lr"],
                0.92, device, d))
            section("quality", lambda d: w.quality(train, test, models["teacher"], models["student"],
                                                   sizes["quality_teacher_epochs"], sizes["quality_student_epochs"],
                                                   sizes["teacher_batch"], device, d))
        else:
            for name in ("teacher", "quality"):
                report.data["skipped"][name] = "not run: ../shared/data/cifar10-jpeg is not there"
        if sizes["compile_arch"]:
            section("compile", lambda d: w.compile_table(*sizes["compile_arch"], sizes["steps"], device, d))
        else:
            report.data["skipped"]["compile"] = "not run at smoke size (compilation takes minutes on a CPU)"
    report.data["projections"] = gpu_projection.project_kits(report.data)
    watchdog.cancel()
    report.write("finished")
    return report


def _overrun(report: Report) -> None:
    """The hard guard: past budget + grace, write what there is and end the process."""
    print("budget overrun: writing partial results and exiting", flush=True)
    report.write("stopped by the wall-clock guard")
    os._exit(3)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=360.0, help="seconds for all sections (default 360)")
    parser.add_argument("--grace", type=float, default=45.0,
                        help="seconds past the budget after which the process writes its results and exits")
    parser.add_argument("--smoke", action="store_true", help="CPU-sized smoke run (seconds; numbers mean nothing)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--real-data", action="store_true", help="with --smoke: CIFAR-10 from ../shared too")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the results files")
    parser.add_argument("--name", default=None, help="results file name (default gpu, or gpu_smoke with --smoke)")
    args = parser.parse_args(argv)
    args.name = args.name or ("gpu_smoke" if args.smoke else "gpu")
    set_cpu_threads()
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    report = run(args, argv)
    print(gpu_projection.markdown(report.data))


if __name__ == "__main__":
    main()
