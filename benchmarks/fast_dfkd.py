"""Time to accuracy of the data-free synthesisers on one backdoored digits teacher.

One small-cnn teacher (BadNets 3x3-px square, 10% poisons, target 0, 12 epochs) is distilled
into a small-cnn student by zskt, dfad, deepinversion, cmi and fast (Fast-DFKD), each at a
digits-sized setting that runs a couple of minutes on one CPU thread. The student's test ACC
and ASR are measured along the way; the table gives the wall seconds to reach 50% and 70%
test ACC, and the final ACC / ASR (does the backdoor come through?).

    OMP_NUM_THREADS=1 python benchmarks/fast_dfkd.py            # writes results/fast_dfkd_digits.{json,md}
    OMP_NUM_THREADS=1 python benchmarks/fast_dfkd.py --smoke    # seconds, writes nothing
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from common import machine, write_results

from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.distill.data_free import distill_data_free
from kdbackdoor.distill.data_free_config import DataFreeConfig
from kdbackdoor.distill.record import Backdoor
from kdbackdoor.teacher import train_teacher
from kdbackdoor.training import TrainConfig
from kdbackdoor.triggers import build_trigger

TRIGGER = "badnets-square:size=12"
# digits-sized settings: 64 images per synthesis round and per student step
SETTINGS = {
    "zskt": {"iterations": 400, "batch_size": 64, "student_steps": 5, "eval_every": 25},
    "dfad": {"iterations": 400, "batch_size": 64, "eval_every": 25},
    "deepinversion": {"iterations": 12, "synthesis_steps": 200, "synthesis_batch_size": 64, "batch_size": 64,
                      "student_steps": 50, "eval_every": 1},
    "cmi": {"iterations": 12, "synthesis_steps": 100, "synthesis_batch_size": 64, "batch_size": 64,
            "student_steps": 50, "eval_every": 1},
    "fast": {"iterations": 60, "synthesis_batch_size": 64, "batch_size": 64, "student_steps": 20, "eval_every": 4},
}
SMOKE = {"iterations": 2, "synthesis_steps": 2, "student_steps": 2, "eval_every": 1}


def seconds_to(history: list[dict], acc: float) -> float | None:
    """Wall seconds at the first evaluation with test ACC ≥ ``acc`` (None if never)."""
    return next((row["seconds"] for row in history if row["test_acc"] >= acc), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="two iterations per method; write nothing")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    train, test = load_dataset("digits", "train", progress=False), load_dataset("digits", "test", progress=False)
    trigger = build_trigger(TRIGGER, image_shape=train.image_shape)
    work = Path(tempfile.mkdtemp(prefix="fast_dfkd_"))
    try:
        recipe = TrainConfig(epochs=2 if args.smoke else 12, batch_size=64, lr=0.05, crop_padding=0, hflip=False,
                             eval_every=0)
        teacher, record = train_teacher(train, test, "small-cnn", recipe, work / "teacher", device=device,
                                        progress=False, trigger=trigger, poison=PoisonConfig(rate=0.1))
        rows = []
        for method, settings in SETTINGS.items():
            settings = {**settings, **SMOKE} if args.smoke else settings
            config = DataFreeConfig(method=method, **settings)
            _, run = distill_data_free(teacher, test, "small-cnn", config, work / method, device=device,
                                       backdoor=Backdoor(trigger, 0), progress=not args.smoke)
            history = [{"iteration": h["iteration"], "seconds": h["seconds"], "test_acc": h["test_acc"],
                        "test_asr": h.get("test_asr")} for h in run["history"]]
            rows.append({"method": method, "settings": settings, "history": history,
                         "seconds_to_50": seconds_to(history, 0.5), "seconds_to_70": seconds_to(history, 0.7),
                         "final_acc": run["metrics"]["acc"], "final_asr": run["metrics"]["asr"],
                         "seconds": history[-1]["seconds"]})
            print(method, rows[-1]["final_acc"], rows[-1]["final_asr"], rows[-1]["seconds"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.smoke:
        return
    data = {"command": "OMP_NUM_THREADS=1 python benchmarks/fast_dfkd.py", "machine": machine(),
            "teacher": {"arch": "small-cnn", "trigger": TRIGGER, "acc": record["metrics"]["acc"],
                        "asr": record["metrics"]["asr"]}, "rows": rows}
    write_results("fast_dfkd_digits", data, markdown(data))


def markdown(data: dict) -> str:
    fmt = lambda s: "never" if s is None else f"{s:.0f}"  # noqa: E731
    lines = [f"Teacher: small-cnn, digits, {data['teacher']['trigger']} (ACC {100 * data['teacher']['acc']:.1f}%, "
             f"ASR {100 * data['teacher']['asr']:.1f}%); student small-cnn; one CPU thread "
             f"({data['machine']['cpu']}, torch {data['machine']['torch']}, {data['machine']['date']}).", "",
             "| method | s to 50% ACC | s to 70% ACC | final ACC % | final ASR % | wall s |", "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(f"| {row['method']} | {fmt(row['seconds_to_50'])} | {fmt(row['seconds_to_70'])} | "
                     f"{100 * row['final_acc']:.1f} | {100 * row['final_asr']:.1f} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
