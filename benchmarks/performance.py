"""Performance of the hot paths, each next to the bare compute it cannot beat.

Everything is measured in one process on one machine; the toolkit path and its bare
counterpart are interleaved for several rounds (``common.interleaved``) and medians are
compared, so a shared machine slows both alike.

- **Dataset KD epoch** (``kdbackdoor.distill.dataset_kd.distill``: batch gather, uint8→float,
  crop + flip, teacher forward, student forward/backward, KD loss, schedule) vs a bare loop
  of the same loss and optimiser over one pre-made float tensor. Also without augmentation,
  where the toolkit caches the teacher's logits (``teacher_logits_cached``) and the bare
  counterpart is the student alone. Target: ratio ≥ 0.9.
- **PGD poison crafting** (``craft_poisoned_set``: sampling, k PGD steps with the trigger in
  the loop, uint8 quantisation, verification, retries, report) vs k teacher forward+backward
  passes per attempt on a pre-made tensor. Target: ratio ≥ 0.9.
- **Data-free KD**: seconds per synthesis step and per student step of every method, and the
  overhead ratios of Shuffling Vaccine (synthesis step), Self-Retrospection (student step)
  and ABD (both) over the plain method.
- **FLOP rate**: model FLOPs (``FlopCounterMode`` on one forward; training ≈ 3× forward) ×
  images/s, as a share of a large ``torch.mm`` timed in each round (fp32 on CPU, bf16 on CUDA).
- **Growth**: KD epoch seconds at several set sizes; resident memory of CIFAR-10 as uint8
  and of the CMI memory bank (and synthetic pool) at their default sizes.

Where a ratio misses its target, the path is profiled (``torch.profiler``) and the top
operators are recorded. Writes ``results/performance.{json,md}``.

Usage: python benchmarks/performance.py [--quick] [--device auto] [--teacher ARCH --student ARCH]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from dataclasses import dataclass, field

import torch

import kdbackdoor.defenses  # noqa: F401  (registers the defenses)
from common import interleaved, medians, rss_bytes, synchronize, timed, top_ops, training_images, write_results
from kdbackdoor.attacks.distill_poisoning import DistillPoisonConfig, craft_poisoned_set
from kdbackdoor.attacks.engines import build_engine
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccineConfig
from kdbackdoor.distill.data_free import METHODS, DataFreeRun
from kdbackdoor.distill.data_free_config import DataFreeConfig
from kdbackdoor.distill.dataset_kd import distill
from kdbackdoor.distill.hooks import DistillDefense, build_defense
from kdbackdoor.distill.losses import KDConfig, kd_loss, precompute_logits
from kdbackdoor.distill.synthesis import ContrastiveInversion
from kdbackdoor.models import build_model
from kdbackdoor.numerics import autocast, layout, to_layout
from kdbackdoor.runtime import select_device, set_cpu_threads
from kdbackdoor.training import TrainConfig, make_optimizer
from kdbackdoor.triggers import build_trigger

TARGET_RATIO = 0.9
SR_TARGET = 2.0
PGD_THRESHOLD = 0.01  # teacher target probability a poison needs (random benchmark teacher)
SR_START = 0.9  # ABD's usual use of SR: the last 10% of the iterations (docs/abd.md)
VARIANTS = ("none", "sv", "sr", "abd")


@dataclass
class Settings:
    """Sizes of one benchmark run (images, steps, rounds); ``quick`` and ``full`` below."""

    teacher: str = "small-cnn"
    student: str = "small-cnn"
    batch: int = 128
    rounds: int = 3
    kd_images: int = 2048
    scaling_sizes: list[int] = field(default_factory=lambda: [10000, 25000, 50000])
    pgd_poisons: int = 128
    pgd_steps: int = 20
    df_batch: int = 64
    df_synthesis_steps: int = 3
    df_student_steps: int = 3
    df_methods: list[str] = field(default_factory=lambda: list(METHODS))
    mm_size: int = 2048
    memory_images: int = 50000
    profile: bool = True


QUICK = dict(rounds=2, kd_images=512, scaling_sizes=[1000, 2500, 5000], pgd_poisons=32, pgd_steps=10,
             df_batch=32, df_synthesis_steps=2, df_student_steps=2, mm_size=1024)
TINY = dict(memory_images=64, batch=16, rounds=1, kd_images=32, scaling_sizes=[32, 64], pgd_poisons=4, pgd_steps=2, df_batch=8,
            df_synthesis_steps=1, df_student_steps=1, mm_size=64)
"""Sizes for the smoke test: seconds, and the numbers mean nothing."""


# ---------------------------------------------------------------- limits


def matmul_flops_per_s(device: torch.device, size: int) -> float:
    """FLOP/s of one ``size``×``size`` matrix product (2·size³ FLOPs): fp32 on CPU, bf16 on CUDA."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # first call picks the kernel
    repeats = 20 if device.type == "cuda" else 2
    seconds = timed(lambda: [torch.mm(a, b) for _ in range(repeats)], device)
    return 2 * size ** 3 * repeats / seconds


def forward_flops(model: torch.nn.Module, image_shape: tuple[int, int, int], device: torch.device) -> float:
    """FLOPs of one forward pass per image (counted by ``FlopCounterMode`` on a batch of 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(2, *image_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2


# ---------------------------------------------------------------- dataset KD


def _kd_config(batch: int, augment: bool) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=batch, lr=0.05, eval_every=0, crop_padding=4 if augment else 0,
                       hflip=augment)


def kd_bare_images_per_s(teacher: torch.nn.Module | None, student: torch.nn.Module, steps: int, batch: int,
                         device: torch.device, kd: KDConfig) -> float:
    """Images/s of the bare KD step (same loss and optimiser as the toolkit) over one pre-made
    float batch: teacher forward (or, with ``teacher`` None, pre-made teacher logits), student
    forward/backward, SGD step. No gathering, conversion, augmentation or bookkeeping."""
    x = torch.rand(batch, student.in_channels, *student.input_size, device=device)
    y = torch.randint(0, student.num_classes, (batch,), device=device)
    idx = torch.arange(batch, device=device)
    if teacher is None:
        logits = torch.randn(batch, student.num_classes, device=device)
        loss_fn = kd_loss(torch.nn.Identity(), kd, logits)
    else:
        loss_fn = kd_loss(teacher, kd)
    to_layout(student).train()  # the layout distill() trains in
    optimizer = make_optimizer(student, _kd_config(batch, False))

    def run() -> None:
        for _ in range(steps):
            with autocast(device):
                loss, _ = loss_fn(student, x, y, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return steps * batch / timed(run, device)


def kd_toolkit_epoch(teacher: torch.nn.Module, data: ImageDataset, test: ImageDataset, student_arch: str,
                     batch: int, device: torch.device, kd: KDConfig, augment: bool) -> dict:
    """One epoch of ``distill`` on ``data``: epoch seconds and images/s (from its history),
    and whether the teacher's logits were cached (they are without augmentation)."""
    with tempfile.TemporaryDirectory() as out:
        _, record = distill(teacher, data, test, student_arch, _kd_config(batch, augment), kd, out, device=device,
                            evaluate_teacher=False, progress=False)
    epoch = record["history"][0]
    return {"seconds": epoch["seconds"], "images_per_s": epoch["images_per_s"],
            "teacher_logits_cached": record["teacher_logits_cached"]}


def kd_benchmark(teacher: torch.nn.Module, data: ImageDataset, test: ImageDataset, s: Settings,
                 device: torch.device) -> dict:
    """Toolkit KD epoch vs bare loop, with augmentation (teacher on the fly) and without (cached
    logits vs the student alone), interleaved; plus the FLOP-rate share of the mm peak."""
    kd = KDConfig(kd_lambda=0.5, temperature=4.0)
    torch.manual_seed(0)
    student = build_model(s.student, data.num_classes, *_shape_args(data)).to(device)
    steps = math.ceil(len(data) / s.batch)
    image_shape = data.image_shape
    measures = {
        "bare_teacher_student": lambda: kd_bare_images_per_s(teacher, student, steps, s.batch, device, kd),
        "toolkit_augmented": lambda: kd_toolkit_epoch(teacher, data, test, s.student, s.batch, device, kd,
                                                      True)["images_per_s"],
        "bare_student_only": lambda: kd_bare_images_per_s(None, student, steps, s.batch, device, kd),
        "toolkit_cached": lambda: kd_toolkit_epoch(teacher, data, test, s.student, s.batch, device, kd,
                                                   False)["images_per_s"],
        "matmul_flops_per_s": lambda: matmul_flops_per_s(device, s.mm_size),
    }
    measures["bare_teacher_student"]()  # warm-up: first calls pick kernels
    values = interleaved(measures, s.rounds)
    m = medians(values)
    cached_flag = kd_toolkit_epoch(teacher, data.subset(torch.arange(min(len(data), s.batch))), test, s.student,
                                   s.batch, device, kd, False)["teacher_logits_cached"]
    precompute_s = timed(lambda: precompute_logits(teacher, data.images.to(device)), device)
    flops_t, flops_s = forward_flops(teacher, image_shape, device), forward_flops(student, image_shape, device)
    train_flops = {"augmented": 3 * flops_s + flops_t, "cached": 3 * flops_s}
    peak = m["matmul_flops_per_s"]
    result = {
        "images": len(data), "batch": s.batch, "steps": steps, "values": values, "medians": m,
        "ratio_augmented": m["toolkit_augmented"] / m["bare_teacher_student"],
        "ratio_cached": m["toolkit_cached"] / m["bare_student_only"],
        "teacher_logits_cached": {"augmented": False, "no_augmentation": cached_flag},
        "precompute_logits_seconds": precompute_s,
        "forward_flops_per_image": {"teacher": flops_t, "student": flops_s},
        "training_flops_per_image": train_flops,
        "matmul_peak_flops_per_s": peak,
        "flop_share": {
            "toolkit_augmented": train_flops["augmented"] * m["toolkit_augmented"] / peak,
            "bare_teacher_student": train_flops["augmented"] * m["bare_teacher_student"] / peak,
            "toolkit_cached": train_flops["cached"] * m["toolkit_cached"] / peak,
        },
    }
    if s.profile and min(result["ratio_augmented"], result["ratio_cached"]) < TARGET_RATIO:
        small = data.subset(torch.arange(min(len(data), 4 * s.batch)))
        result["profile_toolkit_augmented"] = top_ops(
            lambda: kd_toolkit_epoch(teacher, small, test, s.student, s.batch, device, kd, True))
    return result


def kd_scaling(teacher: torch.nn.Module, s: Settings, device: torch.device, test: ImageDataset) -> list[dict]:
    """KD epoch seconds (with augmentation, teacher on the fly) at each of ``s.scaling_sizes`` images."""
    kd = KDConfig(kd_lambda=0.5, temperature=4.0)
    rows = []
    for size in s.scaling_sizes:
        data = training_images(size)
        epoch = kd_toolkit_epoch(teacher, data, test, s.student, s.batch, device, kd, True)
        rows.append({"images": len(data), "seconds": epoch["seconds"],
                     "seconds_per_1k_images": 1000 * epoch["seconds"] / len(data)})
        print(f"  KD epoch {len(data)} images: {epoch['seconds']:.1f} s", flush=True)
    return rows


# ---------------------------------------------------------------- PGD crafting


def pgd_bare_steps_per_s(teacher: torch.nn.Module, batch: int, image_shape: tuple[int, int, int], steps: int,
                         device: torch.device) -> float:
    """Image-steps/s of ``steps`` bare teacher forward+backward passes (gradient to the input)
    on one pre-made batch: what PGD cannot avoid doing."""
    x = layout(torch.rand(batch, *image_shape, device=device)).requires_grad_(True)
    y = torch.zeros(batch, dtype=torch.int64, device=device)

    def run() -> None:
        for _ in range(steps):
            with autocast(device):  # the precision crafting runs the teacher in
                loss = torch.nn.functional.cross_entropy(teacher(x), y, reduction="sum")
            torch.autograd.grad(loss, x)
    return steps * batch / timed(run, device)


def pgd_toolkit(teacher: torch.nn.Module, data: ImageDataset, s: Settings, device: torch.device) -> dict:
    """``craft_poisoned_set`` for about ``s.pgd_poisons`` poisons with PGD (``s.pgd_steps`` steps):
    seconds, attempts, and image-steps/s counting every attempt's k steps."""
    trigger = build_trigger("badnets-square", image_shape=data.image_shape)
    engine = build_engine("pgd", steps=s.pgd_steps)
    rate = s.pgd_poisons / (len(data) + s.pgd_poisons)
    # a random teacher is as slow as a trained one but its outputs are nearly uniform: the low
    # threshold keeps verification (which still runs) from dropping everything; any retries are
    # counted as attempts (each costs k steps, in the bare count too)
    config = DistillPoisonConfig(rate=rate, threshold=PGD_THRESHOLD, batch_size=s.batch)
    report: dict = {}

    def run() -> None:
        report.update(craft_poisoned_set(teacher, data, trigger, engine, config, device=device, progress=False)[1])
    seconds = timed(run, device)
    attempts = report["counts"]["attempts"]
    return {"seconds": seconds, "attempts": attempts, "kept": report["counts"]["kept"],
            "image_steps_per_s": attempts * s.pgd_steps / seconds}


def pgd_benchmark(teacher: torch.nn.Module, data: ImageDataset, s: Settings, device: torch.device) -> dict:
    """Toolkit PGD crafting vs bare k × forward+backward, interleaved; ratio of image-steps/s."""
    runs: list[dict] = []

    def toolkit() -> float:
        runs.append(pgd_toolkit(teacher, data, s, device))
        return runs[-1]["image_steps_per_s"]
    batch = min(s.batch, s.pgd_poisons)
    measures = {"bare": lambda: pgd_bare_steps_per_s(teacher, batch, data.image_shape, s.pgd_steps, device),
                "toolkit": toolkit}
    measures["bare"]()  # warm-up
    values = interleaved(measures, s.rounds)
    m = medians(values)
    result = {"poisons": s.pgd_poisons, "steps": s.pgd_steps, "batch": batch, "values": values, "medians": m,
              "runs": runs, "ratio": m["toolkit"] / m["bare"]}
    if s.profile and result["ratio"] < TARGET_RATIO:
        result["profile_toolkit"] = top_ops(lambda: pgd_toolkit(teacher, data, s, device))
    return result


# ---------------------------------------------------------------- data-free KD


def data_free_run(teacher: torch.nn.Module, method: str, variant: str, s: Settings, device: torch.device) -> DataFreeRun:
    """A data-free run of ``method`` with defense ``variant`` (none, sv, sr, abd) at benchmark sizes.

    The vaccine's tail test is off so that its synthesis term runs from the first step (its
    steady-state cost); everything else has the toolkit's defaults."""
    config = DataFreeConfig(method=method, iterations=1000, batch_size=s.df_batch, synthesis_batch_size=s.df_batch,
                            synthesis_steps=s.df_synthesis_steps, student_steps=s.df_student_steps)
    defense = build_defense(variant, method, vaccine=ShufflingVaccineConfig(tail_test=False))
    torch.manual_seed(0)
    student = build_model(s.student, teacher.num_classes, teacher.in_channels, teacher.input_size).to(device)
    image_shape = (teacher.in_channels, *teacher.input_size)
    return DataFreeRun(teacher, student, image_shape, config, device, defense or DistillDefense())


def _step_seconds(run: DataFreeRun, index: int) -> tuple[float, float]:
    """(seconds per synthesis step, seconds per student step) of one more iteration of ``run``."""
    before = dict(run.seconds)
    run.iteration(index)
    synchronize(run.device)
    config = run.config
    return ((run.seconds["synthesis"] - before["synthesis"]) / config.synthesis_steps,
            (run.seconds["student"] - before["student"]) / config.student_steps)


def data_free_benchmark(teacher: torch.nn.Module, s: Settings, device: torch.device) -> dict:
    """Per method: seconds per synthesis and student step, plain and with SV, SR and ABD
    (interleaved rounds, medians), and the overhead ratios over the plain method."""
    teacher = teacher.eval().requires_grad_(False)
    results = {}
    for method in s.df_methods:
        runs = {variant: data_free_run(teacher, method, variant, s, device) for variant in VARIANTS}
        counters = {variant: 1 for variant in VARIANTS}
        for variant, run in runs.items():
            run.iteration(0)  # warm-up (and a first pool for pooled methods)
        samples: dict[str, list[tuple[float, float]]] = {variant: [] for variant in VARIANTS}

        def measure(variant: str) -> float:
            samples[variant].append(_step_seconds(runs[variant], counters[variant]))
            counters[variant] += 1
            return 0.0
        interleaved({variant: (lambda v=variant: measure(v)) for variant in VARIANTS}, s.rounds)
        synthesis = {v: statistics.median(x[0] for x in samples[v]) for v in VARIANTS}
        student = {v: statistics.median(x[1] for x in samples[v]) for v in VARIANTS}
        sr = student["sr"] / student["none"]
        results[method] = {
            "synthesis_step_seconds": synthesis, "student_step_seconds": student,
            "sv_synthesis_overhead": synthesis["sv"] / synthesis["none"],
            "sr_student_overhead": sr,
            "sr_student_overhead_amortised": SR_START + (1 - SR_START) * sr,
            "abd_synthesis_overhead": synthesis["abd"] / synthesis["none"],
            "abd_student_overhead": student["abd"] / student["none"],
            "plain_throughput": runs["none"].throughput(),
        }
        print(f"  {method}: synthesis step {synthesis['none'] * 1e3:.0f} ms (SV ×{results[method]['sv_synthesis_overhead']:.2f}),"
              f" student step {student['none'] * 1e3:.0f} ms (SR ×{sr:.2f})", flush=True)
    if s.profile and s.df_methods:
        method = s.df_methods[0]
        run = data_free_run(teacher, method, "sr", s, device)
        run.iteration(0)
        results["profile_sr_iteration"] = {"method": method, "ops": top_ops(lambda: run.iteration(1))}
    return results


# ---------------------------------------------------------------- memory


def memory_benchmark(teacher: torch.nn.Module, s: Settings, device: torch.device) -> dict:
    """Bytes of CIFAR-10 held in memory as uint8 (from tensor sizes, and the measured change of
    resident memory when loading it) and of the CMI memory bank and synthetic pool at their
    default sizes (from sizes, and the measured change of resident memory, or the device peak on
    CUDA, once they are full and one more round has been added the way CMI adds it)."""
    before, peak_before = rss_bytes()
    data = training_images(s.memory_images)
    after, peak_after = rss_bytes()
    count = len(data)
    data_bytes = data.images.numel() * data.images.element_size() + data.labels.numel() * data.labels.element_size()
    del data
    config = DataFreeConfig(method="cmi")
    feature_dim = teacher.backbone.fc.in_features
    bank_bytes = config.bank_size * feature_dim * 4
    pool_bytes = config.pool_size * teacher.in_channels * math.prod(teacher.input_size)
    rss_start, _ = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    bank = torch.randn(config.bank_size, feature_dim, device=device)  # full, as after enough CMI rounds
    pool = torch.randint(0, 256, (config.pool_size, teacher.in_channels, *teacher.input_size), dtype=torch.uint8,
                         device=device)
    # one more round's update, as CMI does it: the concatenation briefly holds old and new
    chunk = config.synthesis_batch_size
    bank = torch.cat([bank, torch.randn(chunk, feature_dim, device=device)])[-config.bank_size:]
    pool = torch.cat([pool, pool[:chunk]])[-config.pool_size:]
    rss_end, _ = rss_bytes()
    measured = {"rss_delta_bytes": rss_end - rss_start}
    if device.type == "cuda":
        measured["device_peak_bytes"] = torch.cuda.max_memory_allocated(device) - start_alloc
    del bank, pool
    return {
        "cifar10_uint8": {"images": count, "tensor_bytes": data_bytes,
                          "rss_delta_bytes": after - before, "peak_rss_delta_bytes": peak_after - peak_before},
        "cmi": {"bank_size": config.bank_size, "feature_dim": feature_dim, "bank_bytes": bank_bytes,
                "pool_size": config.pool_size, "pool_bytes": pool_bytes, **measured},
    }


# ---------------------------------------------------------------- run all


def _shape_args(data: ImageDataset) -> tuple[int, tuple[int, int]]:
    c, h, w = data.image_shape
    return c, (h, w)


def run_all(s: Settings, device: torch.device) -> dict:
    """Every measurement above, in one process; returns the results as JSON data."""
    torch.manual_seed(0)
    # CIFAR-10 (or random) images; channels-last as the toolkit's loops make it, so bare loops match
    teacher = to_layout(build_model(s.teacher, 10, 3, (32, 32)).to(device)).eval()
    results = {"settings": s.__dict__, "device": str(device)}
    print("memory", flush=True)
    results["memory"] = memory_benchmark(teacher, s, device)  # first: it measures the data set's first load
    data = training_images(s.kd_images)
    test = data.subset(torch.arange(min(len(data), 256)), name="timing-test")
    print("dataset KD", flush=True)
    results["kd"] = kd_benchmark(teacher, data, test, s, device)
    print("KD scaling", flush=True)
    results["kd_scaling"] = kd_scaling(teacher, s, device, test)
    print("PGD crafting", flush=True)
    results["pgd"] = pgd_benchmark(teacher, data, s, device)
    print("data-free", flush=True)
    results["data_free"] = data_free_benchmark(teacher, s, device)
    return results


def _ops_table(ops: list[dict]) -> list[str]:
    rows = ["| op | calls | self CPU ms | share |", "|---|---|---|---|"]
    rows += [f"| `{o['op']}` | {o['calls']} | {o['self_cpu_ms']:.1f} | {o['share']:.1%} |" for o in ops]
    return rows


def _verdict(ratio: float, target: float = TARGET_RATIO) -> str:
    return "met" if ratio >= target else "missed"


def markdown(r: dict) -> str:
    """The results as a markdown report (tables of ratios, FLOP shares, growth, memory, profiles)."""
    s, kd, pgd, mem = r["settings"], r["kd"], r["pgd"], r["memory"]
    m = kd["medians"]
    mib = 2 ** 20
    lines = [
        f"Device `{r['device']}`; teacher `{s['teacher']}`, student `{s['student']}`, batch {s['batch']}; "
        f"median of {s['rounds']} interleaved rounds.", "",
        "| hot path | toolkit | bare compute | ratio | target |", "|---|---|---|---|---|",
        f"| dataset KD epoch, crop+flip, teacher on the fly ({kd['images']} img) | {m['toolkit_augmented']:.0f} img/s "
        f"| {m['bare_teacher_student']:.0f} img/s | {kd['ratio_augmented']:.2f} | ≥ 0.9 {_verdict(kd['ratio_augmented'])} |",
        f"| dataset KD epoch, no augmentation, teacher logits cached | {m['toolkit_cached']:.0f} img/s "
        f"| {m['bare_student_only']:.0f} img/s (student only) | {kd['ratio_cached']:.2f} | ≥ 0.9 {_verdict(kd['ratio_cached'])} |",
        f"| PGD crafting, {pgd['steps']} steps, trigger + verification ({pgd['poisons']} poisons) "
        f"| {pgd['medians']['toolkit']:.0f} img-steps/s | {pgd['medians']['bare']:.0f} img-steps/s "
        f"| {pgd['ratio']:.2f} | ≥ 0.9 {_verdict(pgd['ratio'])} |", "",
        f"Teacher logits cached: with augmentation {kd['teacher_logits_cached']['augmented']}, without "
        f"{kd['teacher_logits_cached']['no_augmentation']} (one-off precompute: "
        f"{kd['precompute_logits_seconds']:.2f} s for {kd['images']} images).", "",
        "**FLOP rate** (training ≈ 3 × forward FLOPs; teacher 1 × forward):", "",
        "| loop | GFLOP/image | GFLOP/s achieved | share of matmul peak |", "|---|---|---|---|",
    ]
    peak = kd["matmul_peak_flops_per_s"]
    for name, flops_key in (("toolkit_augmented", "augmented"), ("bare_teacher_student", "augmented"),
                            ("toolkit_cached", "cached")):
        per_image = kd["training_flops_per_image"][flops_key]
        lines.append(f"| {name} | {per_image / 1e9:.3f} | {per_image * m[name] / 1e9:.1f} | {kd['flop_share'][name]:.1%} |")
    lines += [f"", f"Matrix-multiply peak ({s['mm_size']}² `torch.mm`, same rounds): {peak / 1e9:.1f} GFLOP/s.", "",
              "**Growth of the KD epoch** (crop+flip, teacher on the fly):", "",
              "| images | seconds | seconds per 1k images |", "|---|---|---|"]
    lines += [f"| {row['images']} | {row['seconds']:.1f} | {row['seconds_per_1k_images']:.2f} |" for row in r["kd_scaling"]]
    c, cmi = mem["cifar10_uint8"], mem["cmi"]
    lines += ["", "**Memory**:", "",
              "| what | from sizes | measured |", "|---|---|---|",
              f"| CIFAR-10 train, uint8 in memory | {c['tensor_bytes'] / mib:.1f} MiB | RSS +{c['rss_delta_bytes'] / mib:.1f} MiB "
              f"(peak +{c['peak_rss_delta_bytes'] / mib:.1f} MiB) |",
              f"| CMI memory bank ({cmi['bank_size']} × {cmi['feature_dim']} fp32) + pool ({cmi['pool_size']} uint8 "
              f"images) | {cmi['bank_bytes'] / mib:.1f} + {cmi['pool_bytes'] / mib:.1f} MiB | "
              + (f"device peak {cmi['device_peak_bytes'] / mib:.1f} MiB" if "device_peak_bytes" in cmi
                 else f"RSS +{cmi['rss_delta_bytes'] / mib:.1f} MiB") + " |",
              "", "**Data-free KD** (ms per step; overheads over the plain method; SV's tail test off, so its term "
              "always runs):", "",
              "| method | synthesis step | student step | SV synthesis | SR student | SR amortised (start 0.9) "
              "| ABD synthesis | ABD student |", "|---|---|---|---|---|---|---|---|"]
    for method, d in r["data_free"].items():
        if method.startswith("profile"):
            continue
        lines.append(
            f"| {method} | {d['synthesis_step_seconds']['none'] * 1e3:.0f} | {d['student_step_seconds']['none'] * 1e3:.0f} "
            f"| ×{d['sv_synthesis_overhead']:.2f} | ×{d['sr_student_overhead']:.2f} "
            f"| ×{d['sr_student_overhead_amortised']:.2f} | ×{d['abd_synthesis_overhead']:.2f} "
            f"| ×{d['abd_student_overhead']:.2f} |")
    for title, ops in (("dataset KD epoch (toolkit, crop+flip)", kd.get("profile_toolkit_augmented")),
                       ("PGD crafting (toolkit)", pgd.get("profile_toolkit")),
                       (f"one SR iteration ({r['data_free'].get('profile_sr_iteration', {}).get('method')})",
                        r["data_free"].get("profile_sr_iteration", {}).get("ops"))):
        if ops:
            lines += ["", f"**Profile: {title}**, top operators by self CPU time:", "", *_ops_table(ops)]
    return "\n".join(lines)


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about two minutes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--teacher", help="teacher architecture (default small-cnn on CPU, wrn-16-2 on CUDA)")
    parser.add_argument("--student", help="student architecture (default small-cnn on CPU, wrn-16-1 on CUDA)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="data-free methods to time")
    parser.add_argument("--no-profile", action="store_true", help="skip profiling paths that miss their target")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    s = Settings(**QUICK) if args.quick else Settings()
    if device.type == "cuda":
        s.teacher, s.student, s.batch, s.df_batch, s.mm_size = "wrn-16-2", "wrn-16-1", 512, 256, 8192
    s.teacher = args.teacher or s.teacher
    s.student = args.student or s.student
    s.rounds = args.rounds or s.rounds
    s.df_methods = args.methods or s.df_methods
    s.profile = not args.no_profile
    return s, device


def main(argv: list[str] | None = None) -> None:
    set_cpu_threads()
    s, device = settings_from_args(argv)
    results = run_all(s, device)
    write_results("performance", results, markdown(results))


if __name__ == "__main__":
    main()
