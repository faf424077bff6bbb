"""Figure: a CIFAR-10 teacher on the shared JPEG ImageFolder, and how long loading it takes.

Measures the first decode of the 60,000 JPEGs (fresh cache), the cached load, then trains a
teacher with a recipe meant for a 2-core CPU and reports test ACC, wall time and training
images/s. Usage: python benchmarks/cifar10_teacher.py [--arch fast-cnn-half] [--epochs 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch

from common import SHARED, write_results
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.runtime import select_device
from kdbackdoor.teacher import train_teacher
from kdbackdoor.training import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="fast-cnn-half")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--label-smoothing", type=float, default=0.2)
    parser.add_argument("--out", default="runs/bench-cifar10-teacher")
    args = parser.parse_args()
    spec = f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg'}"

    cache = tempfile.mkdtemp(prefix="kdb-cache-")
    try:
        started = time.perf_counter()
        load_dataset(spec, "train", cache_dir=cache, progress=False)
        load_dataset(spec, "test", cache_dir=cache, progress=False)
        first = time.perf_counter() - started
        started = time.perf_counter()
        train = load_dataset(spec, "train", cache_dir=cache, progress=False)
        test = load_dataset(spec, "test", cache_dir=cache, progress=False)
        cached = time.perf_counter() - started
    finally:
        shutil.rmtree(cache)

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         label_smoothing=args.label_smoothing, eval_every=0, seed=0)
    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    _, record = train_teacher(train, test, args.arch, config, args.out, device=select_device("auto"),
                              progress=False)
    wall = time.perf_counter() - started
    train_seconds = sum(row["seconds"] for row in record["history"])
    images_per_s = len(train) * args.epochs / train_seconds
    acc = record["metrics"]["acc"]
    data = {"load_first_decode_s": first, "load_cached_s": cached, "arch": args.arch,
            "config": config.model_dump(), "test_acc": acc, "wall_s": wall, "train_images_per_s": images_per_s,
            "history": record["history"]}
    markdown = "\n".join([
        "| measurement | value |", "|---|---|",
        f"| CIFAR-10 JPEG folder, first decode (60,000 files) | {first:.1f} s |",
        f"| same, cached load | {cached:.1f} s |",
        f"| teacher `{args.arch}`, {args.epochs} epochs, batch {args.batch_size} | test ACC {acc:.2%} |",
        f"| wall time (training + evaluation) | {wall / 60:.1f} min |",
        f"| training throughput | {images_per_s:.0f} images/s |",
    ])
    write_results("cifar10_teacher", data, markdown)


if __name__ == "__main__":
    main()
