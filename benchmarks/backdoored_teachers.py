"""Figure: backdoored teachers for each trigger next to a clean teacher trained the same way.

For each data set: a clean teacher, then one teacher per trigger (all-to-one, target 0,
10% of the final training set, poisons replace images); reports ACC, ASR, and each
trigger's ASR on the clean teacher (baseline). Finished runs in --out are reused, so an
interrupted sweep continues where it stopped.
Usage: python benchmarks/backdoored_teachers.py [--datasets cifar10 gtsrb] [--triggers blend sig] [--epochs 3]
Two instances may share --out when their data sets or triggers differ (the clean teacher is trained
by whichever comes first; start the second after it exists).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import SHARED, write_results
from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
from kdbackdoor.data.sources import dataset_record, load_dataset
from kdbackdoor.evaluate import attack_success_rate
from kdbackdoor.models import load_checkpoint
from kdbackdoor.runtime import select_device
from kdbackdoor.teacher import MODEL_FILE, train_teacher
from kdbackdoor.training import TrainConfig
from kdbackdoor.triggers import build_trigger

SETS = {
    "cifar10": (f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg'}",
                ["badnets-grid", "badnets-square", "blend", "trojan-wm", "sig"]),
    "gtsrb": (f"npz:{SHARED / 'data' / 'gtsrb32'}", ["badnets-grid", "blend"]),
}


def teacher(spec, train, test, arch, config, out: Path, device, trigger=None, train_missing=True):
    """Train (or reuse a finished) teacher in ``out``; return (model, record), or None when it is
    not finished and ``train_missing`` is false. The checkpoint records ``spec`` so that other
    commands can reload its data set."""
    if (out / "metrics.json").exists():
        model, _ = load_checkpoint(out / MODEL_FILE, device=device)
        return model, json.loads((out / "metrics.json").read_text())
    if not train_missing:
        return None
    return train_teacher(train, test, arch, config, out, device=device, progress=False, resume=True,
                         metadata={"dataset": dataset_record(spec, None, None)},
                         trigger=trigger, poison=PoisonConfig(target=0, rate=0.1) if trigger else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--triggers", nargs="+", help="only these triggers (default: all of each data set's)")
    parser.add_argument("--arch", default="fast-cnn-half")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--out", default="runs/bench-backdoored-teachers")
    parser.add_argument("--report-only", action="store_true", help="train nothing: the table of the teachers "
                        "finished so far")
    args = parser.parse_args()
    device = select_device("auto")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, label_smoothing=0.2,
                         eval_every=0, seed=0)
    rows, results = [], {}
    for name in args.datasets:
        spec, triggers = SETS[name]
        train, test = load_dataset(spec, "train", progress=False), load_dataset(spec, "test", progress=False)
        finished = teacher(spec, train, test, args.arch, config, Path(args.out) / name / "clean", device,
                           train_missing=not args.report_only)
        if finished is None:
            continue
        clean, clean_record = finished
        clean_acc = clean_record["metrics"]["acc"]
        results[f"{name}/clean"] = {"acc": clean_acc, "train_minutes": train_minutes(clean_record)}
        for trigger_name in [t for t in triggers if not args.triggers or t in args.triggers]:
            trig = build_trigger(trigger_name, image_shape=train.image_shape)
            finished = teacher(spec, train, test, args.arch, config, Path(args.out) / name / trigger_name, device,
                               trig, train_missing=not args.report_only)
            if finished is None:
                continue
            record = finished[1]
            baseline = attack_success_rate(clean, test, trig, 0, device=device)["asr"]
            acc, asr = record["metrics"]["acc"], record["metrics"]["asr"]
            results[f"{name}/{trigger_name}"] = {"acc": acc, "asr": asr, "clean_acc": clean_acc,
                                                 "clean_model_asr": baseline, "train_minutes": train_minutes(record)}
            rows.append(f"| {name} | {trigger_name} | {acc:.1%} | {asr:.1%} | {clean_acc:.1%} | "
                        f"{acc - clean_acc:+.1%} | {baseline:.1%} | {train_minutes(record):.0f} |")
            print(rows[-1], flush=True)
    markdown = "\n".join([
        f"Teachers `{args.arch}`, {args.epochs} epochs, batch {args.batch_size}, one-cycle SGD peak lr {args.lr}, "
        "label smoothing 0.2; poisoning all-to-one, target 0, 10% of the final training set (replace).", "",
        "Clean teachers: " + "; ".join(f"{key.split('/')[0]} {value['acc']:.1%} ACC, {value['train_minutes']:.0f} min"
                                       for key, value in results.items() if key.endswith("/clean")) + ".", "",
        "| data | trigger | ACC | ASR | clean teacher ACC | ACC change | clean teacher's ASR | training minutes |",
        "|---|---|---|---|---|---|---|---|", *rows,
    ])
    write_results("backdoored_teachers", {"config": config.model_dump(), "arch": args.arch, "results": results},
                  markdown)


def train_minutes(record: dict) -> float:
    """The teacher's training wall time in minutes (sum of its epochs)."""
    return sum(epoch["seconds"] for epoch in record["history"]) / 60


if __name__ == "__main__":
    main()
