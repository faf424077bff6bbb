"""An ImageNet-style teacher end to end at 64 px: backdoored ResNet-18, the poisoned-set attack,
a distilled student, a data audit and a model scan, each through the ``kdbackdoor`` command line.

Data: CIFAR-10 from ../shared/data, upscaled (bilinear) to --size px, --classes classes with
--train-per-class / --test-per-class images each (seeded), written once as npz under --out.
Steps, each one command whose exact line, wall time and peak memory (the process's max RSS) are
recorded:
  1. train-teacher  resnet18-imagenet, BadNets grid backdoor (target 0, 10% of the training set)
  2. poison-distill PGD poisons with the white square for target 1, verified on that teacher (5%)
  3. distill        a mobilenet-v2 student on the poisoned set (λ = 1, KL only); ASR of both triggers
  4. audit-data     the default set filters on the poisoned set, scored against its provenance
  5. scan           Neural Cleanse + STRIP on the teacher, with the grid as the known trigger
Then what one image costs at 64 px and at 224 px on the device (inference and a training step).

--scale cpu (default) is sized for about 10 minutes on one idle CPU thread and is small (few images,
few epochs): its accuracies say that the pipeline runs at this resolution, not what the recipe
reaches. --scale gpu is the same pipeline on all ten classes and the full splits, with more
epochs, e.g. on a CUDA machine:
  python benchmarks/real_teacher.py --scale gpu --out runs/bench-real-teacher-gpu
Writes results/real_teacher.{json,md} (results/real_teacher_NAME.* for another --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import SHARED, machine, variant_suffix, write_results

DEFAULT_OUT = "runs/bench-real-teacher"
SCALES = {
    "cpu": dict(classes=10, train_per_class=100, test_per_class=30, teacher_epochs=6, student_epochs=6,
                scan_subset=60, scan_steps=30, poison_threshold=0.2),
    "smoke": dict(classes=3, train_per_class=20, test_per_class=10, teacher_epochs=1, student_epochs=1,
                  scan_subset=20, scan_steps=5, poison_threshold=0.01),
    "gpu": dict(classes=10, train_per_class=5000, test_per_class=1000, teacher_epochs=40, student_epochs=40,
                scan_subset=1000, scan_steps=300, poison_threshold=0.5),
}
TEACHER_TRIGGER, TEACHER_TARGET = "badnets-grid", 0
ATTACK_TRIGGER, ATTACK_TARGET = "badnets-square", 1


def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what the platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return machine()["cpu"]


def build_data(out: Path, size: int, classes: int, train_per_class: int, test_per_class: int, seed: int) -> Path:
    """npz train/test splits of upscaled CIFAR-10 (the first ``classes`` classes), written once."""
    folder = out / "data"
    if (folder / "test.npz").is_file():
        return folder
    from kdbackdoor.data.sources import load_dataset
    folder.mkdir(parents=True, exist_ok=True)
    spec = f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg'}"
    generator = torch.Generator().manual_seed(seed)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        data = load_dataset(spec, split, progress=False)
        rows = []
        for label in range(classes):
            members = torch.nonzero(data.labels == label).flatten()
            rows.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
        subset = data.subset(torch.cat(rows).sort()[0])
        images = torch.nn.functional.interpolate(subset.images.float(), size=(size, size), mode="bilinear",
                                                 align_corners=False).round().clamp(0, 255).to(torch.uint8)
        np.savez(folder / f"{split}.npz", x=images.permute(0, 2, 3, 1).numpy(), y=subset.labels.numpy(),
                 classes=np.array(subset.classes[:classes]))
    return folder


def run_step(name: str, args: list[str], log: Path) -> dict:
    """Run ``kdbackdoor ARGS`` in its own process; its command line, wall seconds and peak RSS."""
    command = [sys.executable, "-c", "from kdbackdoor.cli import main; main()", *args]
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"step {name} failed ({code}); see {log}")
    shown = "kdbackdoor " + " ".join(shlex.quote(a) for a in args)
    print(f"{name}: {seconds:.0f} s, peak {usage.ru_maxrss / 1024:.0f} MiB", flush=True)
    return {"command": shown, "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def per_image_cost(size: int, device: torch.device, batch: int = 16, rounds: int = 3) -> dict:
    """Milliseconds per image for resnet18-imagenet inference and a training step at ``size`` px."""
    from kdbackdoor.models import build_model
    model = build_model("resnet18-imagenet", 10, input_size=(size, size)).to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    def infer() -> None:
        with torch.no_grad():
            model(x)

    timings = {}
    for name, fn in (("train_step", step), ("inference", infer)):
        model.train(name == "train_step")
        fn()  # warm-up
        values = []
        for _ in range(rounds):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            values.append((time.perf_counter() - started) / batch * 1e3)
        timings[f"{name}_ms_per_image"] = sorted(values)[len(values) // 2]
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    parser.add_argument("--size", type=int, default=64, help="image side in px")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    scale = SCALES[args.scale]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = build_data(out, args.size, scale["classes"], scale["train_per_class"], scale["test_per_class"], args.seed)
    npz = f"npz:{data}"
    common = ["--device", args.device, "--seed", str(args.seed), "--no-progress"]
    teacher, poisons, student = out / "teacher", out / "poisoned-set", out / "student"
    steps = {}
    plan = [
        ("train-teacher", ["train-teacher", "--dataset", npz, "--arch", "resnet18-imagenet",
                           "--epochs", str(scale["teacher_epochs"]), "--batch-size", "64", "--lr", "0.05",
                           "--crop-padding", str(args.size // 8), "--hflip", "--eval-every", "0",
                           "--backdoor", TEACHER_TRIGGER, "--target", str(TEACHER_TARGET),
                           "--poison-rate", "0.1", "--out", str(teacher)]),
        ("poison-distill", ["poison-distill", "--teacher", str(teacher), "--dataset", npz,
                            "--trigger", ATTACK_TRIGGER, "--target", str(ATTACK_TARGET), "--rate", "0.05",
                            "--method", "pgd", "--threshold", str(scale["poison_threshold"]), "--out", str(poisons)]),
        ("distill", ["distill", "--teacher", str(teacher), "--data", str(poisons), "--student-arch", "mobilenet-v2",
                     "--kd-lambda", "1", "--test-data", npz, "--trigger", ATTACK_TRIGGER,
                     "--target", str(ATTACK_TARGET), "--epochs", str(scale["student_epochs"]), "--batch-size", "64",
                     "--lr", "0.05", "--eval-every", "0", "--out", str(student)]),
        ("audit-data", ["audit-data", "--teacher", str(teacher), "--data", str(poisons),
                        "--expected-rate", "0.05", "--out", str(out / "audit")]),
        ("scan", ["scan", "--model", str(teacher), "--data", npz, "--subset", str(scale["scan_subset"]),
                  "--steps", str(scale["scan_steps"]), "--trigger", TEACHER_TRIGGER, "--out", str(out / "scan")]),
    ]
    for name, step_args in plan:
        steps[name] = run_step(name, step_args + common, out / f"{name}.log")

    results = {"scale": args.scale, "recipe": {**scale, "size": args.size, "seed": args.seed},
               "cpu_model": cpu_model(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "steps": steps, "outcomes": outcomes(out)}
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    results["per_image"] = {str(size): per_image_cost(size, device) for size in (args.size, 224)}
    results["per_image_device"] = str(device)
    results["total_seconds"] = time.perf_counter() - started
    write_results("real_teacher" + variant_suffix(args.out, DEFAULT_OUT), results, markdown(results))


def outcomes(out: Path) -> dict:
    """The figures each step wrote: ACC/ASR, poisons kept, filter detection, scan verdict."""
    teacher = json.loads((out / "teacher" / "metrics.json").read_text())
    student = json.loads((out / "student" / "metrics.json").read_text())
    manifest = json.loads((out / "poisoned-set" / "manifest.json").read_text())
    audit = json.loads((out / "audit" / "audit.json").read_text())
    scan = json.loads((out / "scan" / "scan.json").read_text())
    filters = {name: {"flagged": entry["flagged"], **{k: entry.get("detection", {}).get(k)
                                                      for k in ("auroc", "tpr_at_5_fpr", "precision", "recall")}}
               for name, entry in audit.get("filters", audit).items() if isinstance(entry, dict) and "flagged" in entry}
    cleanse = scan["neural_cleanse"]
    return {
        "teacher": {"acc": teacher["metrics"]["acc"], "asr": teacher["metrics"]["asr"],
                    "train_size": teacher["train"]["size"], "test_size": teacher["test"]["size"]},
        "poisoned_set": {"counts": manifest["counts"]},
        "student": {k: student["metrics"].get(k) for k in ("acc", "asr")},
        "audit": filters,
        "scan": {"suspected": cleanse.get("suspected"), "anomaly_index": cleanse.get("anomaly_index"),
                 "strip_auroc": scan["strip"].get("auroc")},
    }


def markdown(results: dict) -> str:
    o, s, recipe = results["outcomes"], results["steps"], results["recipe"]
    audit = ", ".join(f"{name} {v['auroc']:.2f}" for name, v in o["audit"].items() if v.get("auroc") is not None)
    rows = {
        "train-teacher": (f"resnet18-imagenet, {TEACHER_TRIGGER} → class {TEACHER_TARGET}",
                          f"ACC {o['teacher']['acc']:.1%}, ASR {o['teacher']['asr']:.1%}"),
        "poison-distill": (f"PGD, {ATTACK_TRIGGER} → class {ATTACK_TARGET}, 5%",
                           f"{o['poisoned_set']['counts']['kept']} poisons kept of {o['poisoned_set']['counts']['tried']} tried"),
        "distill": ("mobilenet-v2 student, λ = 1, on the poisoned set",
                    f"ACC {o['student']['acc']:.1%}, ASR ({ATTACK_TRIGGER}) {o['student']['asr']:.1%}"),
        "audit-data": (f"{len(o['audit'])} set filters, scored against the provenance", f"AUROC: {audit}"),
        "scan": ("Neural Cleanse + STRIP on the teacher",
                 f"suspected class {o['scan']['suspected']}, STRIP AUROC on the grid {o['scan']['strip_auroc']:.2f}"),
    }
    lines = [
        f"ImageNet-style teacher at {recipe['size']} px, scale `{results['scale']}`: {recipe['classes']} CIFAR-10 "
        f"classes upscaled, {o['teacher']['train_size']} training / {o['teacher']['test_size']} test images, teacher "
        f"{recipe['teacher_epochs']} epochs, student {recipe['student_epochs']} epochs. CPU: {results['cpu_model']}, "
        f"OMP_NUM_THREADS={results['omp_num_threads']}; total {results['total_seconds'] / 60:.1f} min.", "",
        "| step | what | outcome | wall s | peak MiB |", "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {what} | {outcome} | {s[name]['seconds']:.0f} | {s[name]['peak_rss_mib']:.0f} |"
              for name, (what, outcome) in rows.items()]
    lines += ["", f"Per image on {results['per_image_device']} (resnet18-imagenet, batch 16, median of 3):", "",
              "| side | inference ms | training step ms |", "|---|---|---|"]
    lines += [f"| {size} px | {cost['inference_ms_per_image']:.1f} | {cost['train_step_ms_per_image']:.1f} |"
              for size, cost in results["per_image"].items()]
    lines += ["", "Commands:", ""] + [f"- {name}: `{step['command']}`" for name, step in s.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
