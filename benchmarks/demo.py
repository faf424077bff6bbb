"""`kdbackdoor demo` as a benchmark: run it, time it, and keep its table as a result file.

    python benchmarks/demo.py                                   # digits -> results/demo_digits.{json,md}
    python benchmarks/demo.py --dataset cifar10 --data-dir DIR  # -> results/demo_cifar10.{json,md}
    python benchmarks/demo.py --dataset imagefolder:../../shared/data/cifar10-jpeg   # -> results/demo_imagefolder.*

The table is the one the demo prints; the JSON holds the demo's whole summary (ACC, ASR, the
filter's detection figures) with the wall time, the machine and this command.
"""

from __future__ import annotations

import argparse
import time

from common import write_results
from kdbackdoor.demo import run_demo, summary_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="demo folder (default runs/bench-demo-DATASET)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out (the wall "
                        "time recorded is then that of the last call only)")
    args = parser.parse_args()
    name = args.dataset.split(":")[0]
    started = time.perf_counter()
    summary = run_demo(args.out or f"runs/bench-demo-{name}", dataset=args.dataset, data_dir=args.data_dir,
                       device=args.device, progress=False, resume=args.resume)
    wall = time.perf_counter() - started
    for key in ("results", "report"):  # paths of this machine
        summary.pop(key, None)
    markdown = (f"`kdbackdoor demo --dataset {args.dataset}`: {wall:.0f} s wall.\n\n" + summary_markdown(summary))
    write_results(f"demo_{name}", {"wall_s": wall, "resumed": args.resume, "summary": summary}, markdown)


if __name__ == "__main__":
    main()
