"""Figure: training throughput of the toolkit's loop next to a bare loop, same process.

For each architecture, at batch 128: (a) a bare forward+backward+SGD loop over one
pre-made float tensor — the compute the toolkit cannot beat; (b) ``kdbackdoor.training.fit``
over an in-memory uint8 data set (batch gather, uint8→float, random crop + flip on the
device, loss, step). The two are interleaved for several rounds so that a noisy machine
affects both alike; medians are reported. Usage: python benchmarks/throughput.py [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from common import training_images, write_results
from kdbackdoor.data.augment import augment
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.models import build_model
from kdbackdoor.numerics import to_layout
from kdbackdoor.training import TrainConfig, cross_entropy_loss, fit

BATCH = 128


def bare_images_per_s(model: torch.nn.Module, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.rand(BATCH, 3, 32, 32)
    y = torch.randint(0, 10, (BATCH,))
    started = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * BATCH / (time.perf_counter() - started)


def pipeline_images_per_s(data: ImageDataset, rounds: int = 20) -> float:
    """The data pipeline alone: batch gather, uint8→float, crop + flip (what fit adds to the bare loop)."""
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(rounds):
        for x, _, _ in data.batches(BATCH, shuffle=True, generator=generator):
            augment(x, crop_padding=4, hflip=True, generator=generator)
    return rounds * len(data) / (time.perf_counter() - started)


def toolkit_images_per_s(model: torch.nn.Module, data: ImageDataset) -> float:
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=0.01, eval_every=0)
    with tempfile.TemporaryDirectory() as out:
        history = fit(model, data, config, out, loss_fn=cross_entropy_loss(), progress=False)
    return history[0]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8, help="steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=["wrn-16-1", "wrn-16-2"])
    args = parser.parse_args()
    data = training_images(args.steps * BATCH)
    pipeline = pipeline_images_per_s(data)
    rows, results = [], {"pipeline_only_images_per_s": pipeline}
    for arch in args.archs:
        torch.manual_seed(0)
        model = to_layout(build_model(arch, num_classes=10)).train()  # fit() trains in this layout
        bare_images_per_s(model, 2)  # warm-up: first calls pick kernels
        bare, toolkit = [], []
        for _ in range(args.rounds):
            bare.append(bare_images_per_s(model, args.steps))
            toolkit.append(toolkit_images_per_s(model, data))
        b, t = statistics.median(bare), statistics.median(toolkit)
        # pipeline time per image as a share of the bare step's time per image
        share = b / pipeline
        results[arch] = {"bare_images_per_s": bare, "toolkit_images_per_s": toolkit, "ratio": t / b,
                         "pipeline_share_of_step": share}
        rows.append(f"| `{arch}` | {b:.0f} | {t:.0f} | {t / b:.2f} | {share:.2%} |")
        print(rows[-1], flush=True)
    markdown = "\n".join([
        f"Batch {BATCH}, {args.steps} steps per measurement, median of {args.rounds} interleaved rounds. "
        f"Data pipeline alone (gather, uint8→float, crop+flip): {pipeline:.0f} images/s.", "",
        "| model | bare fwd+bwd loop (img/s) | kdbackdoor training loop (img/s) | ratio | pipeline time / step time |",
        "|---|---|---|---|---|", *rows,
    ])
    write_results("throughput", {"steps": args.steps, "rounds": args.rounds, "results": results}, markdown)


if __name__ == "__main__":
    main()
