"""Figures: distillation-set filters and robust distillation against the PGD-poisoned CIFAR-10 set.

On the 5% PGD set of ``distill_attack.py`` (4,211 images, 211 poisons, 4 px white square, target
airplane) and its clean teacher:
  1. every filter's AUROC, TPR at 5% FPR, precision and recall against the provenance (the
     filters themselves never read it); reference-model only with --reference;
  2. a student distilled after removing what the best filter (highest AUROC, a choice made
     with the ground truth, as a benchmark may) flags with its own rule and with --expected-rate;
  3. a student distilled with --defense robust-kd on the poisoned set, and one on the
     unpoisoned set (what the defense costs without any poison).
Students use the recipe of distill_attack.py (λ = 1, T = 4, no augmentation, every 5th test image;
--student and --epochs as the attack's run used), and the table puts them beside the attack's
undefended and unpoisoned λ = 1 students read from --attack-results. Finished stages in --out are
reused. Writes results/filters.{json,md}; with another --out than the default, a variant's files
carry that folder's name (results/filters_NAME.*).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS, SHARED, variant_suffix, write_results
from kdbackdoor.atomic import write_json
from kdbackdoor.data.poisoned_set import load_poisoned_set
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.defenses.audit import audit_report, remove_flagged, run_filters
from kdbackdoor.defenses.filters import AuditContext, build_filter
from kdbackdoor.defenses.filters.base import flag_top_share, score_against_provenance
from kdbackdoor.defenses.robust_kd import RobustKD, RobustKDConfig
from kdbackdoor.distill.dataset_kd import distill
from kdbackdoor.distill.losses import KDConfig
from kdbackdoor.distill.record import Backdoor
from kdbackdoor.models import load_checkpoint
from kdbackdoor.runtime import select_device
from kdbackdoor.training import TrainConfig
from kdbackdoor.triggers import build_trigger

CIFAR = f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg'}"
DEFAULT_OUT = "runs/bench-filters"
ATTACK_ROWS = {"poisoned, no defense": "pgd-rate0.05-size4-lambda1.0",
               "unpoisoned, no defense": "clean-rate0.05-size4-lambda1.0"}  # distill_attack.py's run names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="runs/bench-distill-attack/sets/pgd-rate0.05-size4")
    parser.add_argument("--teacher", default="runs/bench-cifar10-teacher")
    parser.add_argument("--reference", default=None, help="a second CIFAR-10 model for reference-model")
    parser.add_argument("--filters", nargs="+", default=["label-disagreement", "brittleness", "spectral",
                                                         "activation-clustering", "strip"])
    parser.add_argument("--strip-blends", type=int, default=4, help="STRIP blends per image (CPU time)")
    parser.add_argument("--expected-rate", type=float, default=0.10,
                        help="second removal rule: flag this share (a defender's guess, 2× the true rate)")
    parser.add_argument("--num-views", type=int, default=4, help="robust-kd views per target (CPU time)")
    parser.add_argument("--jpeg-quality", type=int, default=RobustKDConfig().views.jpeg_quality,
                        help="JPEG quality of robust-kd's views (lower: stronger views)")
    parser.add_argument("--test-every", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--student", default="small-cnn", help="student architecture (the attack run's)")
    parser.add_argument("--attack-results", type=Path, default=RESULTS / "distill_attack.json",
                        help="distill_attack.py's results, for the undefended and unpoisoned students")
    parser.add_argument("--students", nargs="*", default=["remove", "remove-rate", "robust", "robust-clean"])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    out, device = Path(args.out), select_device("auto")
    data, manifest = load_poisoned_set(args.set)
    teacher, _ = load_checkpoint(args.teacher, device=device)
    attack = json.loads(args.attack_results.read_text())["runs"]
    results = {"recipe": {**vars(args), "attack_results": str(args.attack_results)}, "size": len(data),
               "poisons": int(data.provenance.poisoned.sum()),
               "attack_students": {label: attack[run] for label, run in ATTACK_ROWS.items() if run in attack}}
    variant = variant_suffix(args.out, DEFAULT_OUT)

    filter_file = out / "filters.json"
    if filter_file.exists():
        results["filters"] = json.loads(filter_file.read_text())
        flags = torch.load(out / "flags.pt", weights_only=True)
    else:
        reference = load_checkpoint(args.reference, device=device)[0] if args.reference else None
        names = args.filters + (["reference-model"] if reference is not None else [])
        params = {"strip": {"blends": args.strip_blends}, "brittleness": {"draws": 1}}  # CPU time
        chosen = [build_filter(name, **params.get(name, {})) for name in names]
        ran = run_filters(data, AuditContext(teacher, device, reference), chosen, progress=False)
        results["filters"] = audit_report(data, ran)
        flags = {result.name: {"own": result.flags, "scores": result.scores} for result, _ in ran}
        for result, _ in ran:
            top, rule = flag_top_share(result.scores, args.expected_rate)
            result.flags, result.rule = top, rule
            results["filters"][result.name]["at_expected_rate"] = score_against_provenance(
                result, data.provenance.poisoned)
        write_json(filter_file, results["filters"])
        torch.save(flags, out / "flags.pt")
    publish(results, variant)

    best = max(results["filters"], key=lambda name: results["filters"][name]["detection"]["auroc"] or 0)
    results["best_filter"] = best
    test = load_dataset(CIFAR, "test", progress=False)
    test = test.subset(torch.arange(0, len(test), args.test_every), name=f"cifar10-test[::{args.test_every}]")
    backdoor = Backdoor(build_trigger(manifest["trigger"]), manifest["target"])
    config = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05, crop_padding=0, hflip=False, eval_every=0,
                         seed=0)
    views = RobustKDConfig().views.model_copy(update={"jpeg_quality": args.jpeg_quality})
    robust = RobustKDConfig(num_views=args.num_views, views=views)
    results["students"] = {}
    scores = flags[best]["scores"]
    plans = {  # "remove": the best filter's own rule, as `audit-data --remove` applies it
        "remove": lambda: data.subset(~flags[best]["own"], name=f"removed-by-{best}"),
        "remove-rate": lambda: data.subset(~flag_top_share(scores, args.expected_rate)[0], name="removed-top-rate"),
        "robust": lambda: data,
        "robust-clean": lambda: data.subset(~data.provenance.poisoned, name="unpoisoned"),
    }
    for name in args.students:
        train = plans[name]()
        folder = out / "students" / name
        if (folder / "metrics.json").exists():
            record = json.loads((folder / "metrics.json").read_text())
        else:
            started = time.perf_counter()
            _, record = distill(teacher, train, test, args.student, config, KDConfig(kd_lambda=1.0, temperature=4.0),
                                folder, device=device, backdoor=backdoor, evaluate_teacher=False, resume=True,
                                progress=False, defense=RobustKD(robust) if name.startswith("robust") else None)
            record["bench_seconds"] = time.perf_counter() - started
            write_json(folder / "metrics.json", record)
        results["students"][name] = {"acc": record["metrics"]["acc"], "asr": record["metrics"]["asr"],
                                     "train_size": record["train"]["size"], "poisons": record["train"]["poisoned"],
                                     "defense": record.get("defense"), "seconds": record.get("bench_seconds")}
        print(f"{name}: ACC {record['metrics']['acc']:.2%} ASR {record['metrics']['asr']:.2%} "
              f"({record['train']['poisoned']} poisons in {record['train']['size']})", flush=True)
        publish(results, variant)


def publish(results: dict, variant: str) -> None:
    """Write the tables; ``variant`` ("" for the default --out) names the files."""
    lines = [f"Set: {results['size']} images, {results['poisons']} PGD poisons (5%).", "",
             "| filter | own rule | flagged | AUROC | TPR@5%FPR | precision | recall | "
             f"precision / recall at top {results['recipe']['expected_rate']:.0%} | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(value):
        return "n/a" if value is None else f"{value:.3f}"

    for name, entry in results["filters"].items():
        d, r = entry["detection"], entry.get("at_expected_rate", {})
        lines.append(f"| {name} | {entry['rule']} | {entry['flagged']} | {f(d['auroc'])} | {f(d['tpr_at_5fpr'])} | "
                     f"{f(d['precision'])} | {f(d['recall'])} | {f(r.get('precision'))} / {f(r.get('recall'))} | "
                     f"{entry['seconds']:.0f} |")
    if results.get("students"):
        recipe = results["recipe"]
        lines += ["", f"Students ({recipe['student']}, {recipe['epochs']} epochs, λ = 1; best filter by AUROC: "
                  f"{results['best_filter']}; robust-kd: {recipe['num_views']} crop-flip + JPEG "
                  f"{recipe['jpeg_quality']} views):", "",
                  "| student | train size | poisons left | ACC | ASR |", "|---|---|---|---|---|"]
        for name, row in results["attack_students"].items():
            lines.append(f"| {name} (the attack run, {Path(recipe['attack_results']).name}) | {row['train_size']} | "
                         f"{row['poisons']} | {row['acc']:.2%} | {row['asr']:.2%} |")
        for name, row in results["students"].items():
            lines.append(f"| {name} | {row['train_size']} | {row['poisons']} | {row['acc']:.2%} | {row['asr']:.2%} |")
    write_results("filters" + variant, results, "\n".join(lines))


if __name__ == "__main__":
    main()
