"""Figure: does Neural Cleanse name the target class of poisoned students, and not of clean models?

CIFAR-10: every student in --students (distilled from the clean teacher by distill_attack.py;
folders named pgd-/fgsm-... were distilled on sets poisoned towards class 0 with the 4 px
white square, clean-... on the same sets without the poisons) and the clean teacher, scanned
with a seeded subset of the CIFAR-10 test images. Digits: small-cnns backdoored with the
badnets-square (10% poisons, a different target per seed) and clean ones at the same seeds.

Per model: flagged classes, anomaly index and mask norm of the target, the model's ASR as
recorded when it was made (report only: the scan never sees it), STRIP AUROC with the known
trigger, and hit = the target flagged (backdoored) / nothing flagged (clean). Writes
results/scan.{json,md} (with another --out than the default, results/scan_NAME.* after that
folder's name); finished scans are kept in --out and reused, so an interrupted run continues.

CPU recipe (default): 300 test images, 150 steps of 16 images × 10 classes; about 2-4 CPU
minutes per CIFAR-10 model on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import SHARED, variant_suffix, write_results
from kdbackdoor.attacks.teacher_poisoning import PoisonConfig, poison_training_set
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.defenses.neural_cleanse import NeuralCleanseConfig
from kdbackdoor.defenses.scan import SCAN_FILE, scan_model, write_scan
from kdbackdoor.models import build_model, load_checkpoint
from kdbackdoor.runtime import cpu_generator, seed_everything
from kdbackdoor.training import TrainConfig, cross_entropy_loss, fit
from kdbackdoor.triggers import build_trigger

CIFAR = f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg'}"
CIFAR_TARGET = 0
CIFAR_TRIGGER = "badnets-square:size=4"
DEFAULT_OUT = "runs/bench-scan"


def scan_once(out: Path, model, data, config: NeuralCleanseConfig, trigger, record: dict) -> dict:
    """Scan (or reuse the finished scan in ``out``); returns scan.json's content."""
    if (out / SCAN_FILE).exists():
        return json.loads((out / SCAN_FILE).read_text())
    started, cpu = time.perf_counter(), time.process_time()
    report = scan_model(model, data, config, trigger=trigger)
    timing = {"seconds": round(time.perf_counter() - started, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}
    write_scan(report, out, {**record, **timing})
    return json.loads((out / SCAN_FILE).read_text())


def row(name: str, kind: str, target: int, asr: float | None, acc: float | None, scan: dict) -> dict:
    cleanse = scan["neural_cleanse"]
    flagged = cleanse["flagged"]
    backdoored = kind == "backdoored"
    entry = cleanse["per_class"][target]
    return {"model": name, "kind": kind, "target": target, "recorded_asr": asr, "recorded_acc": acc,
            "flagged": flagged, "target_anomaly_index": entry["anomaly_index"], "target_norm": entry["norm"],
            "median_norm": cleanse["median_norm"], "strip_auroc": scan["strip"].get("auroc"),
            "hit": (target in flagged) if backdoored else not flagged,
            "seconds": scan["seconds"], "cpu_seconds": scan["cpu_seconds"]}


def cifar_rows(args, config: NeuralCleanseConfig, out: Path, rows: list[dict], recipe: dict) -> None:
    test = load_dataset(CIFAR, "test", progress=False)
    picked = torch.randperm(len(test), generator=cpu_generator(args.seed))[:args.images].sort()[0]
    data = test.subset(picked, name=f"cifar10-test[{args.images} seeded]")
    trigger = build_trigger(CIFAR_TRIGGER, image_shape=data.image_shape)
    students = sorted((Path(p) for p in args.students), key=_informative_first)
    models = [(folder, "clean" if folder.name.startswith("clean") else "backdoored") for folder in students]
    models.insert(min(len(models), 5), (Path(args.teacher), "clean teacher"))
    for folder, kind in models:
        model, _ = load_checkpoint(folder, device="cpu")
        metrics = json.loads((folder / "metrics.json").read_text()).get("metrics", {})
        scan = scan_once(out / "cifar10" / folder.name, model, data, config, trigger,
                         {"model": str(folder), "images": len(data)})
        kind = "clean" if kind == "clean teacher" else kind
        rows.append({"data": "cifar10", **row(folder.name, kind, CIFAR_TARGET, metrics.get("asr"), metrics.get("acc"),
                                              scan)})
        publish(rows, recipe)


def _informative_first(folder: Path) -> tuple:
    """λ = 1 then 0.5 first (pgd, its clean baseline, fgsm), the other λ after: a run cut short
    still compares poisoned and clean students."""
    lam = float(folder.name.rsplit("lambda", 1)[-1]) if "lambda" in folder.name else 0.0
    return ({1.0: 0, 0.5: 1}.get(lam, 2), -lam, folder.name)


def digits_rows(args, config: NeuralCleanseConfig, out: Path, rows: list[dict], recipe: dict) -> None:
    from kdbackdoor.evaluate import model_metrics
    train, test = load_dataset("digits", "train", progress=False), load_dataset("digits", "test", progress=False)
    trigger = build_trigger("badnets-square", image_shape=train.image_shape)
    for seed in args.digits_seeds:
        target = (3 + 4 * seed) % 10
        for kind in ("backdoored", "clean"):
            name = f"digits-{kind}-seed{seed}" + (f"-target{target}" if kind == "backdoored" else "")
            data = train if kind == "clean" else poison_training_set(
                train, trigger, PoisonConfig(target=target, rate=0.1, seed=seed))
            seed_everything(seed)
            model = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8))
            fit(model, data, TrainConfig(epochs=8, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0,
                                         seed=seed), out / "digits" / name / "train", loss_fn=cross_entropy_loss(),
                progress=False, resume=True)
            model.eval()
            metrics = model_metrics(model, test, trigger=trigger, target=target)
            scan = scan_once(out / "digits" / name / "scan", model, test, config.model_copy(update={"seed": seed}),
                             trigger, {"model": name, "images": len(test)})
            rows.append({"data": "digits", **row(name, kind, target, metrics["asr"], metrics["acc"], scan)})
            publish(rows, recipe)


def publish(rows: list[dict], recipe: dict) -> None:
    """Rewrite results/scan[_VARIANT].{json,md} with the rows so far (a long run shows progress)."""
    write_results("scan" + variant_suffix(recipe["out"], DEFAULT_OUT), {"recipe": recipe, "rows": rows},
                  markdown(rows, recipe))


def markdown(rows: list[dict], recipe: dict) -> str:
    lines = [f"Neural Cleanse: {recipe['steps']} steps × {recipe['batch_size']} images per class, "
             f"{recipe['images']} CIFAR-10 test images / the 359 digits test images; anomaly threshold 2.", "",
             "| data | model | kind | target | recorded ASR | flagged | AI of target | L1 target / median | "
             "STRIP AUROC | hit | CPU s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flagged = ", ".join(map(str, r["flagged"])) or "none"
        asr = "" if r["recorded_asr"] is None else f"{r['recorded_asr']:.1%}"
        auroc = "" if r["strip_auroc"] is None else f"{r['strip_auroc']:.2f}"
        lines.append(f"| {r['data']} | {r['model']} | {r['kind']} | {r['target']} | {asr} | {flagged} | "
                     f"{r['target_anomaly_index']:.2f} | {r['target_norm']:.1f} / {r['median_norm']:.1f} | {auroc} | "
                     f"{'yes' if r['hit'] else 'no'} | {r['cpu_seconds']:.0f} |")
    lines.append("")
    for data in ("cifar10", "digits"):
        for kind in ("backdoored", "clean"):
            chosen = [r for r in rows if r["data"] == data and r["kind"] == kind]
            if chosen:
                lines.append(f"- {data}, {kind}: {sum(r['hit'] for r in chosen)} hits of {len(chosen)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", nargs="*", default=sorted(str(p) for p in Path(
        "runs/bench-distill-attack/students").glob("*") if (p / "model.safetensors").exists()))
    parser.add_argument("--teacher", default="runs/bench-cifar10-teacher")
    parser.add_argument("--images", type=int, default=300, help="CIFAR-10 test images used by the scan")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--digits-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    config = NeuralCleanseConfig(steps=args.steps, batch_size=args.batch_size, adjust_every=5, seed=args.seed)
    out = Path(args.out)
    recipe = {**vars(args), "config": config.model_dump()}
    rows: list[dict] = []
    digits_rows(args, config, out, rows, recipe)
    if not args.skip_cifar:
        cifar_rows(args, config, out, rows, recipe)


if __name__ == "__main__":
    main()
