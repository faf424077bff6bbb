"""Figures: the poisoned-distillation-set attack (arXiv 2504.21323) against a clean CIFAR-10 teacher.

Sweeps, each student distilled from the same clean teacher on a seeded subset of CIFAR-10:
  lambda  - λ ∈ {0, .25, .5, .75, 1} at 5% PGD poisons, with unpoisoned baselines at λ ∈ {0, .5, 1}
  methods - FGSM vs PGD vs CW at λ = 1
  rates   - poison rate {0.5, 1, 2, 5}% at λ = 1 (PGD)
  sizes   - white-square trigger side {2, 3, 4, 6} px at λ = 1 (PGD)
Finished runs and poisoned sets in --out are reused and interrupted crafting continues, so an
interrupted sweep goes on where it stopped; the results file is rewritten after every run.
Writes results/distill_attack.{json,md} and the ASR-vs-λ plot docs/figures/asr_vs_lambda.png;
with another --out than the default, a variant's files carry that folder's name
(results/distill_attack_NAME.*, docs/figures/asr_vs_lambda_NAME.png).

CPU recipe (default; about 4-5 min per student on 2 cores): 4,000 training images, every 5th test
image, small-cnn student, 10 epochs, no augmentation (so the teacher's logits are computed once).
Paper scale on a GPU, e.g.:
  python benchmarks/distill_attack.py --teacher T --subset 0 --test-every 1 --student resnet18 \\
      --epochs 100 --augment --out runs/bench-distill-attack-full
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import ROOT, SHARED, variant_suffix, write_results
from kdbackdoor.attacks.distill_poisoning import CRAFT_STATE_FILE, DistillPoisonConfig, craft_poisoned_set
from kdbackdoor.attacks.engines import build_engine
from kdbackdoor.data.poisoned_set import load_poisoned_set, save_poisoned_set
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.distill.dataset_kd import distill
from kdbackdoor.distill.losses import KDConfig
from kdbackdoor.distill.record import Backdoor
from kdbackdoor.models import load_checkpoint
from kdbackdoor.runtime import select_device
from kdbackdoor.training import TrainConfig
from kdbackdoor.triggers import build_trigger

CIFAR = f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg'}"
DEFAULT_OUT = "runs/bench-distill-attack"
SWEEPS = ["lambda", "methods", "rates", "sizes"]
# (sweep, engine, poison rate, trigger side in px, λ, unpoisoned baseline?), most telling runs
# first so that a sweep cut short still answers the main questions
PLAN = ([("lambda", "pgd", 0.05, 4, lam, False) for lam in (1.0, 0.5, 0.0)]
        + [("lambda", "pgd", 0.05, 4, lam, True) for lam in (1.0, 0.5, 0.0)]
        + [("methods", "fgsm", 0.05, 4, 1.0, False)]
        + [("lambda", "pgd", 0.05, 4, lam, False) for lam in (0.25, 0.75)]
        + [("rates", "pgd", rate, 4, 1.0, False) for rate in (0.005, 0.01, 0.02)]
        + [("sizes", "pgd", 0.05, size, 1.0, False) for size in (2, 3, 6)]
        + [("methods", "cw", 0.05, 4, 1.0, False)])
ENGINES = {"pgd": {}, "fgsm": {}, "cw": {"steps": 50}}  # CW: half the default Adam steps, for CPU time


def poisoned_set(out: Path, teacher, train, method: str, rate: float, size: int, seed: int,
                 engine_params: dict | None = None):
    """Craft (or reuse, or continue crafting) the poisoned set for one engine / rate / trigger size;
    the engine's settings are ``engine_params`` (default: ``ENGINES[method]``)."""
    folder = out / "sets" / f"{method}-rate{rate}-size{size}"
    if (folder / "manifest.json").exists():
        return load_poisoned_set(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trigger = build_trigger(f"badnets-square:size={size}", image_shape=train.image_shape, seed=seed)
    engine = build_engine(method, **(ENGINES[method] if engine_params is None else engine_params))
    started = time.perf_counter()
    data, report = craft_poisoned_set(teacher, train, trigger, engine,
                                      DistillPoisonConfig(target=0, rate=rate, seed=seed), progress=False,
                                      state_path=folder / CRAFT_STATE_FILE, resume=True)
    manifest = {"trigger": trigger.config(), "target": 0, "engine": engine.config(),
                "craft_seconds": time.perf_counter() - started, **report}  # this process's share when resumed
    save_poisoned_set(data, folder, manifest)
    (folder / CRAFT_STATE_FILE).unlink()
    return load_poisoned_set(folder)


def student(out: Path, name: str, teacher, train, test, backdoor, lam: float, config: TrainConfig, arch: str):
    """Distill (or reuse) one student; returns its record."""
    folder = out / "students" / name
    if (folder / "metrics.json").exists():
        return json.loads((folder / "metrics.json").read_text())
    _, record = distill(teacher, train, test, arch, config, KDConfig(kd_lambda=lam, temperature=4.0), folder,
                        device=select_device("auto"), backdoor=backdoor, evaluate_teacher=False, resume=True,
                        progress=False)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/bench-cifar10-teacher",
                        help="clean CIFAR-10 teacher (default: the one cifar10_teacher.py writes)")
    parser.add_argument("--subset", type=int, default=4000, help="distillation images (0: all 50,000)")
    parser.add_argument("--test-every", type=int, default=5, help="use every Nth test image")
    parser.add_argument("--student", default="small-cnn")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--augment", action="store_true", help="random crop (4 px) and flips while distilling")
    parser.add_argument("--sweeps", nargs="+", default=SWEEPS, choices=SWEEPS,
                        help="sweeps to run; finished runs of the others in --out stay in the table")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    out, device, seed = Path(args.out), select_device("auto"), 0
    variant = variant_suffix(args.out, DEFAULT_OUT)
    teacher, _ = load_checkpoint(args.teacher, device=device)
    train = load_dataset(CIFAR, "train", progress=False)
    test = load_dataset(CIFAR, "test", progress=False)
    if args.subset:
        rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:args.subset].sort()[0]
        train = train.subset(rows, name=f"cifar10-train[{args.subset}]")
    test = test.subset(torch.arange(0, len(test), args.test_every), name=f"cifar10-test[::{args.test_every}]")
    config = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05, crop_padding=4 if args.augment else 0,
                         hflip=args.augment, eval_every=0, seed=seed)

    from kdbackdoor.evaluate import model_metrics
    square = build_trigger("badnets-square", image_shape=train.image_shape)
    results = {"recipe": {**vars(args), "train_size": len(train), "test_size": len(test),
                          "config": config.model_dump(), "engines": ENGINES},
               "teacher": model_metrics(teacher, test, trigger=square, target=0, device=device), "runs": {}}

    def record(name, sweep, method, rate, size, lam, rec, manifest=None):
        row = {"sweep": sweep, "method": method, "rate": rate, "trigger_px": size, "kd_lambda": lam,
               "acc": rec["metrics"]["acc"], "asr": rec["metrics"]["asr"],
               "train_size": rec["train"]["size"], "poisons": rec["train"]["poisoned"],
               "seconds": sum(h["seconds"] for h in rec["history"])}
        if manifest is not None:
            row.update(counts=manifest["counts"], teacher_stability=manifest["teacher_stability"],
                       perturbation=manifest["perturbation"])
        results["runs"][name] = row
        publish(results, variant)

    for sweep, method, rate, size, lam, clean in PLAN:
        name = f"{'clean' if clean else method}-rate{rate}-size{size}-lambda{lam}"
        if sweep not in args.sweeps and not (out / "students" / name / "metrics.json").exists():
            continue  # runs of other sweeps are only listed when a previous call finished them
        data, manifest = poisoned_set(out, teacher, train, method, rate, size, seed)
        trigger = build_trigger(manifest["trigger"])
        if clean:
            data = data.subset(~data.provenance.poisoned, name="cifar10-train-unpoisoned")
        rec = student(out, name, teacher, data, test, Backdoor(trigger, 0), lam, config, args.student)
        record(name, "baseline" if clean else sweep, method, rate, size, lam, rec, None if clean else manifest)
        print(f"{name}: ACC {rec['metrics']['acc']:.2%} ASR {rec['metrics']['asr']:.2%}", flush=True)


def publish(results: dict, variant: str) -> None:
    """Write the results table and the plot; ``variant`` ("" for the default --out) names their files."""
    runs = results["runs"]
    teacher = results["teacher"]
    lines = [f"Teacher: ACC {teacher['acc']:.2%}, ASR of the 4 px square on it {teacher['asr']:.2%} "
             f"(test images: {results['recipe']['test_size']}).", "",
             "| run | poisons kept / tried | teacher P(target) with / without trigger / clean | ACC | ASR |",
             "|---|---|---|---|---|"]
    for name, row in runs.items():
        if "counts" in row:
            c, s = row["counts"], row["teacher_stability"]
            kept = f"{c['kept']} / {c['tried']}"
            stability = (f"{s['poison_with_trigger']['mean']:.2f} / {s['poison_without_trigger']['mean']:.2f} / "
                         f"{s['clean_source']['mean']:.2f}")
        else:
            kept, stability = "none (baseline)", ""
        lines.append(f"| {name} | {kept} | {stability} | {row['acc']:.2%} | {row['asr']:.2%} |")
    write_results("distill_attack" + variant, results, "\n".join(lines))
    plot_lambda(runs, variant)


def plot_lambda(runs: dict, variant: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = {"poisoned (5% PGD)": "lambda", "unpoisoned baseline": "baseline"}
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for label, sweep in series.items():
        points = sorted((row["kd_lambda"], row["asr"]) for row in runs.values()
                        if row["sweep"] == sweep or (sweep == "lambda" and row["method"] == "pgd"
                                                     and row["rate"] == 0.05 and row["trigger_px"] == 4
                                                     and row["sweep"] != "baseline"))
        if points:
            axis.plot(*zip(*points), marker="o", label=label)
    if not axis.lines:  # no λ run in this call's results: keep the plot a previous call drew
        plt.close(figure)
        return
    axis.set_xlabel("λ (weight of the KL term)")
    axis.set_ylabel("student ASR")
    axis.set_ylim(0, 1)
    axis.legend()
    axis.set_title("Poisoned distillation set, clean teacher (CIFAR-10)")
    figure.tight_layout()
    path = ROOT / "docs" / "figures" / f"asr_vs_lambda{variant}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
