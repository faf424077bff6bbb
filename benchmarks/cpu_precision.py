"""bf16 + channels-last against fp32 on a CPU: throughput of the toolkit's loops, each hot path's
ratio to its bare compute in the same precision and layout, and whether bf16 keeps quality.

All in one process on one thread, the variants interleaved round by round (fp32 NCHW, fp32
channels-last, bf16 channels-last, then again), so that a machine shared with other jobs slows
them alike; the load average before and after is recorded.

1. throughput (images/s, median of rounds), WRN-16-2 teacher and WRN-16-1 student:
   teacher training (``fit``, crop + flip), dataset KD (``distill``, crop + flip, teacher on the
   fly), ZSKT iterations (1 generator step + 2 student steps, attention transfer);
2. ratios to bare compute, per variant: teacher training vs bare training steps, dataset KD vs
   the bare KD step, PGD crafting vs k forward+backward passes, evaluation vs bare forwards, the
   ZSKT student step vs a bare KD step (the ZSKT step also samples its images from the generator
   and adds attention transfer, so a ratio under 1 there is partly real work);
3. quality: a BadNets-grid teacher and a dataset-KD student on real CIFAR-10, trained in fp32 and
   in bf16 with the same seeds and data; ACC and ASR side by side (tolerance below).

Usage: python benchmarks/cpu_precision.py [--smoke] [--rounds 3]
Writes results/cpu_precision.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import gpu_workloads as w
import performance
from common import interleaved, medians, timed, training_images, write_results
from kdbackdoor.distill.losses import KDConfig
from kdbackdoor.models import build_model
from kdbackdoor.numerics import Numerics, autocast, layout, to_layout, use_numerics
from kdbackdoor.training import TrainConfig, cross_entropy_loss, fit

TOLERANCE = {"acc": 0.02, "asr": 0.05}
"""Quality tolerance, bf16 − fp32 (absolute): ACC within 2 points, ASR within 5 points. One seed
each; the fp32 run's own seed-to-seed spread at these sizes is of the same order."""
FULL = dict(teacher="wrn-16-2", student="wrn-16-1", images=256, batch=64, zskt_batch=32, pgd_poisons=32,
            pgd_steps=10, rounds=3, quality_teacher="fast-cnn-half", quality_student="small-cnn",
            quality_images=10000, quality_test=2000, quality_teacher_epochs=4, quality_student_epochs=3,
            quality_batch=128)
SMOKE = dict(teacher="small-cnn", student="small-cnn", images=32, batch=16, zskt_batch=8, pgd_poisons=4,
             pgd_steps=2, rounds=1, quality_teacher="small-cnn", quality_student="small-cnn", quality_images=64,
             quality_test=64, quality_teacher_epochs=1, quality_student_epochs=1, quality_batch=32)


def _fit_rate(arch: str, data, batch: int, device: torch.device) -> float:
    config = TrainConfig(epochs=1, batch_size=batch, eval_every=0, seed=0)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10).to(device)
    with tempfile.TemporaryDirectory() as out:
        history = fit(model, data, config, out, loss_fn=cross_entropy_loss(), device=device, progress=False)
    return history[0]["images_per_s"]


def _zskt_rate(run, device: torch.device) -> tuple[float, float]:
    """(images/s of one ZSKT iteration counting student images, the student step's images/s)."""
    before = dict(run.seconds)
    seconds = timed(lambda: run.iteration(1), device)
    student = (run.seconds["student"] - before["student"]) / run.config.student_steps
    return run.config.batch_size * run.config.student_steps / seconds, run.config.batch_size / student


def variant_measures(s: dict, data, test, device: torch.device) -> dict:
    """name -> measure for every variant and path (toolkit and bare), to be interleaved."""
    from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccineConfig  # noqa: F401 (import cost outside)
    from kdbackdoor.distill.data_free import DataFreeConfig, _Run
    from kdbackdoor.distill.hooks import DistillDefense
    from kdbackdoor.evaluate import accuracy
    kd = KDConfig(kd_lambda=0.5, temperature=4.0)
    ps = performance.Settings(teacher=s["teacher"], student=s["student"], batch=s["batch"],
                              pgd_poisons=s["pgd_poisons"], pgd_steps=s["pgd_steps"], profile=False)
    measures = {}
    for name, numerics in w.VARIANTS.items():
        with use_numerics(numerics):
            torch.manual_seed(0)
            teacher = to_layout(build_model(s["teacher"], 10).to(device)).eval()
            student = build_model(s["student"], 10).to(device)
            zskt = _Run(teacher.requires_grad_(False), build_model(s["student"], 10).to(device), (3, 32, 32),
                        DataFreeConfig(method="zskt", iterations=100, batch_size=s["zskt_batch"], student_steps=2),
                        device, DistillDefense())
            zskt.iteration(0)
        steps = -(-len(data) // s["batch"])

        def within(fn, n=numerics):
            def measure():
                with use_numerics(n):
                    return fn()
            return measure
        zskt_last: dict = {}

        def zskt_iteration(run=zskt, last=zskt_last):
            last["iteration"], last["student_step"] = _zskt_rate(run, device)
            return last["iteration"]

        def bare_eval(model=teacher):
            x = layout(torch.rand(min(512, len(test)), 3, 32, 32, device=device))
            batches = -(-len(test) // len(x))
            with torch.no_grad(), autocast(device):
                return len(test) / timed(lambda: [model(x).argmax(1) for _ in range(batches)], device)
        measures.update({
            f"{name}/teacher_training": within(lambda: _fit_rate(s["teacher"], data, s["batch"], device)),
            f"{name}/teacher_training_bare": within(lambda: w.train_step_rate(s["teacher"], s["batch"], steps, device)),
            f"{name}/dataset_kd": within(lambda t=teacher: performance.kd_toolkit_epoch(
                t, data, test, s["student"], s["batch"], device, kd, True)["images_per_s"]),
            f"{name}/dataset_kd_bare": within(lambda t=teacher, st=student: performance.kd_bare_images_per_s(
                t, st, steps, s["batch"], device, kd)),
            f"{name}/zskt_iteration": within(zskt_iteration),
            f"{name}/zskt_student_step": lambda last=zskt_last: last["student_step"],
            f"{name}/zskt_student_step_bare": within(lambda: w.train_step_rate(
                s["student"], s["zskt_batch"], 2, device, teacher=s["teacher"])),
            f"{name}/pgd": within(lambda t=teacher: performance.pgd_toolkit(t, data, ps, device)["image_steps_per_s"]),
            f"{name}/pgd_bare": within(lambda t=teacher: performance.pgd_bare_steps_per_s(
                t, min(s["batch"], s["pgd_poisons"]), (3, 32, 32), s["pgd_steps"], device)),
            f"{name}/evaluation": within(lambda t=teacher: len(test) / timed(
                lambda: accuracy(t, test, device=device), device)),
            f"{name}/evaluation_bare": within(bare_eval),
        })
    return measures


def summarise(m: dict) -> dict:
    """Speed-ups over fp32 NCHW and toolkit/bare ratios, per variant."""
    paths = ("teacher_training", "dataset_kd", "zskt_iteration")
    ratios = ("teacher_training", "dataset_kd", "zskt_student_step", "pgd", "evaluation")
    return {
        "speedup_over_fp32_nchw": {v: {p: m[f"{v}/{p}"] / m[f"fp32-nchw/{p}"] for p in paths} for v in w.VARIANTS},
        "ratio_to_bare": {v: {p: m[f"{v}/{p}"] / m[f"{v}/{p}_bare"] for p in ratios} for v in w.VARIANTS},
    }


def quality_check(s: dict, device: torch.device) -> dict:
    from common import _cifar10_train
    from kdbackdoor.data.sources import load_dataset
    from common import SHARED
    if _cifar10_train() is None:
        return {"skipped": "../shared/data/cifar10-jpeg is not there"}
    train = training_images(s["quality_images"])
    test = load_dataset(f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg'}", "test", progress=False)
    test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:s["quality_test"]])
    result = w.quality(train, test, s["quality_teacher"], s["quality_student"], s["quality_teacher_epochs"],
                       s["quality_student_epochs"], s["quality_batch"], device, w.Deadline(10 ** 9))
    result["tolerance"] = TOLERANCE
    result["within_tolerance"] = {k: abs(v) <= TOLERANCE[k.split("_")[1]] for k, v in result["bf16_minus_fp32"].items()}
    return result


def markdown(r: dict) -> str:
    m, sm = r["medians"], r["summary"]
    load = r["load_average"]
    lines = [f"One thread, {r['settings']['rounds']} interleaved rounds (medians); load average (1 min) "
             f"{load['before'][0]:.1f} before, {load['after'][0]:.1f} after, on a machine with "
             f"{os.cpu_count()} cores shared with other jobs. Teacher `{r['settings']['teacher']}`, student "
             f"`{r['settings']['student']}`, {r['settings']['images']} CIFAR-10 images per epoch, batch "
             f"{r['settings']['batch']}; ZSKT batch {r['settings']['zskt_batch']} (1 generator + 2 student steps).", "",
             "| loop | fp32 NCHW | fp32 channels-last | bf16 channels-last | bf16 + CL / fp32 NCHW |",
             "|---|---|---|---|---|"]
    for path, title in (("teacher_training", "teacher training (img/s)"), ("dataset_kd", "dataset KD (img/s)"),
                        ("zskt_iteration", "ZSKT iteration (student img/s)")):
        lines.append(f"| {title} | " + " | ".join(f"{m[f'{v}/{path}']:.0f}" for v in w.VARIANTS)
                     + f" | ×{sm['speedup_over_fp32_nchw']['bf16-cl'][path]:.2f} |")
    lines += ["", "Toolkit path / bare compute in the same precision and layout (target ≥ 0.9):", "",
              "| path | fp32 NCHW | fp32 channels-last | bf16 channels-last |", "|---|---|---|---|"]
    for path in ("teacher_training", "dataset_kd", "zskt_student_step", "pgd", "evaluation"):
        lines.append(f"| {path.replace('_', ' ')} | "
                     + " | ".join(f"{sm['ratio_to_bare'][v][path]:.2f}" for v in w.VARIANTS) + " |")
    q = r["quality"]
    if "skipped" in q:
        lines += ["", f"Quality: not measured ({q['skipped']})."]
    else:
        lines += ["", f"Quality on CIFAR-10 ({q['train_images']} training images, {q['test_images']} test images; "
                  f"BadNets-grid teacher `{q['teacher']}` {q['teacher_epochs']} epochs, student `{q['student']}` "
                  f"{q['student_epochs']} epochs of dataset KD at λ 0.5; tolerance ACC ±{TOLERANCE['acc']:.0%}, "
                  f"ASR ±{TOLERANCE['asr']:.0%}):", "",
                  "| precision | teacher ACC | teacher ASR | student ACC | student ASR | seconds |",
                  "|---|---|---|---|---|---|"]
        for p in ("fp32", "bf16"):
            lines.append(f"| {p} | {q[p]['teacher_acc']:.1%} | {q[p]['teacher_asr']:.1%} | {q[p]['student_acc']:.1%} "
                         f"| {q[p]['student_asr']:.1%} | {q[p]['seconds']:.0f} |")
        d = q["bf16_minus_fp32"]
        lines.append("| bf16 − fp32 | " + " | ".join(
            f"{d[k] * 100:+.1f} pt {'(within)' if q['within_tolerance'][k] else '(outside)'}"
            for k in ("teacher_acc", "teacher_asr", "student_acc", "student_asr")) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--name", default="cpu_precision")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    s = dict(SMOKE if args.smoke else FULL)
    s["rounds"] = args.rounds or s["rounds"]
    device = torch.device("cpu")
    before = os.getloadavg()
    started = time.perf_counter()
    data = training_images(s["images"])
    test = data.subset(torch.arange(min(len(data), 256)), name="timing-test")
    values = interleaved(variant_measures(s, data, test, device), s["rounds"])
    m = medians(values)
    result = {"settings": s, "values": values, "medians": m, "summary": summarise(m)}
    result["quality"] = quality_check(s, device)
    result["load_average"] = {"before": before, "after": os.getloadavg()}
    result["seconds"] = time.perf_counter() - started
    write_results(args.name, result, markdown(result))


if __name__ == "__main__":
    main()
