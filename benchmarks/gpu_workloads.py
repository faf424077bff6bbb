"""The measurements of ``gpu.py``, one function per section; each takes a ``Deadline`` and stops
(returning what it has, with a note) when the time it was given is spent.

Step rates are images per second of one training step (forward, backward, optimiser) on one
pre-made batch: the bare compute every hot path is compared with, in the same precision and
layout (the numerics policy in force)."""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import time

import torch

from common import interleaved, medians, synchronize, timed
from kdbackdoor.models import build_model
from kdbackdoor.numerics import Numerics, autocast, compiled, layout, numerics_record, to_layout, use_numerics
from kdbackdoor.training import TrainConfig, make_optimizer


class OutOfTime(Exception):
    """Raised inside a section when its share of the budget is spent."""


class Deadline:
    """A wall-clock limit: ``left()`` seconds remain; ``check()`` raises ``OutOfTime`` past it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        if self.left() <= 0:
            raise OutOfTime


VARIANTS = {  # name -> numerics
    "fp32-nchw": Numerics("fp32", channels_last=False),
    "fp32-cl": Numerics("fp32", channels_last=True),
    "bf16-cl": Numerics("bf16", channels_last=True),
}


def make_train_step(arch: str, batch: int, device: torch.device, *, compile_model: bool = False,
                    teacher: str | None = None):
    """A function doing one bare training step of ``arch`` on one pre-made batch (cross-entropy; with
    ``teacher``, the KD step: teacher forward + student forward/backward), under the current policy."""
    torch.manual_seed(0)
    model = to_layout(build_model(arch, num_classes=10).to(device)).train()
    step_model = compiled(model, force=compile_model)
    teacher_model = to_layout(build_model(teacher, num_classes=10).to(device)).eval() if teacher else None
    optimizer = make_optimizer(model, TrainConfig(batch_size=batch))
    x = layout(torch.rand(batch, 3, 32, 32, device=device))
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with autocast(device):
            logits = step_model(x)
            if teacher_model is None:
                loss = torch.nn.functional.cross_entropy(logits, y)
            else:
                with torch.no_grad():
                    target = teacher_model(x).float().softmax(1)
                loss = torch.nn.functional.cross_entropy(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def train_step_rate(arch: str, batch: int, steps: int, device: torch.device, *, compile_model: bool = False,
                    teacher: str | None = None) -> float:
    """Images/s of ``steps`` bare training steps (``make_train_step``) after 3 untimed ones."""
    step = make_train_step(arch, batch, device, compile_model=compile_model, teacher=teacher)
    for _ in range(3):  # kernel choice (and compilation) outside the timing
        step()
    return steps * batch / timed(lambda: [step() for _ in range(steps)], device)


def precision_table(archs: list[tuple[str, int]], steps: int, rounds: int, device: torch.device,
                    deadline: Deadline) -> dict:
    """Bare training-step images/s of each (arch, batch) in fp32 NCHW, fp32 channels-last and
    bf16 channels-last, interleaved rounds, medians; speed-ups over fp32 NCHW."""
    out = {}
    for arch, batch in archs:
        deadline.check()
        measures = {}
        for name, numerics in VARIANTS.items():
            def measure(n=numerics):
                with use_numerics(n):
                    return train_step_rate(arch, batch, steps, device)
            measures[name] = measure
        m = medians(interleaved(measures, rounds))
        out[arch] = {"batch": batch, "images_per_s": m,
                     "speedup_over_fp32_nchw": {k: v / m["fp32-nchw"] for k, v in m.items()}}
        print(f"  {arch}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in m.items()), flush=True)
    return out


def compile_table(arch: str, batch: int, steps: int, device: torch.device, deadline: Deadline) -> dict:
    """Bare training-step images/s of ``arch`` in bf16 channels-last, eager vs torch.compile (the
    compilation's seconds apart)."""
    deadline.check()
    with use_numerics(VARIANTS["bf16-cl"]):
        eager = train_step_rate(arch, batch, steps, device)
        started = time.perf_counter()
        compiled_rate = train_step_rate(arch, batch, steps, device, compile_model=True)
        seconds = time.perf_counter() - started - steps * batch / compiled_rate
    return {"arch": arch, "batch": batch, "eager_images_per_s": eager, "compiled_images_per_s": compiled_rate,
            "speedup": compiled_rate / eager, "compile_and_warmup_seconds": seconds}


def hot_paths(teacher_arch: str, student_arch: str, data, kd_images: int, batch: int, pgd_poisons: int,
              pgd_steps: int, rounds: int, device: torch.device, deadline: Deadline) -> dict:
    """Dataset KD epoch, PGD crafting and evaluation against their bare compute, in the current
    policy (``performance.py``'s measures, at these sizes)."""
    import performance
    from kdbackdoor.evaluate import accuracy
    s = performance.Settings(teacher=teacher_arch, student=student_arch, batch=batch, rounds=rounds,
                             kd_images=kd_images, pgd_poisons=pgd_poisons, pgd_steps=pgd_steps, profile=False,
                             mm_size=4096 if device.type == "cuda" else 256)
    torch.manual_seed(0)
    teacher = to_layout(build_model(teacher_arch, 10, 3, (32, 32)).to(device)).eval()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))  # every class, not the first
    subset = data.subset(order[:kd_images])
    test = data.subset(order[:1024], name="timing-test")
    out = {"numerics": numerics_record(device)}
    deadline.check()
    kd = performance.kd_benchmark(teacher, subset, test, s, device)
    out["dataset_kd"] = {"ratio_augmented": kd["ratio_augmented"], "ratio_cached": kd["ratio_cached"],
                         "medians": kd["medians"]}
    deadline.check()
    pgd = performance.pgd_benchmark(teacher, subset, s, device)
    out["pgd"] = {"ratio": pgd["ratio"], "medians": pgd["medians"], "steps": pgd_steps, "poisons": pgd_poisons}
    deadline.check()
    evaluation = subset.to(device)

    def bare_eval() -> float:  # the same images in the same batches, pre-made, no bookkeeping
        x = layout(torch.rand(min(512, len(evaluation)), 3, 32, 32, device=device))
        batches = -(-len(evaluation) // len(x))
        with torch.no_grad(), autocast(device):
            seconds = timed(lambda: [teacher(x).argmax(1) for _ in range(batches)], device)
        return len(evaluation) / seconds
    m = medians(interleaved({"bare": bare_eval, "toolkit": lambda: len(evaluation) / timed(
        lambda: accuracy(teacher, evaluation, device=device), device)}, rounds))
    out["evaluation"] = {"ratio": m["toolkit"] / m["bare"], "medians": m}
    return out


def zskt_iterations(teacher_arch: str, student_arch: str, batch: int, student_steps: int, iterations: int,
                    device: torch.device, deadline: Deadline) -> dict:
    """Seconds per ZSKT iteration (one generator step + ``student_steps`` student steps of ``batch``,
    attention transfer on) plain, with ABD's vaccine on (SV), and in ABD's SR phase (SR + SV), and
    the plain student step against a bare KD step of the same batch."""
    import kdbackdoor.defenses  # noqa: F401  (registers the defenses)
    from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccineConfig
    from kdbackdoor.distill.data_free import DataFreeRun
    from kdbackdoor.distill.data_free_config import DataFreeConfig
    from kdbackdoor.distill.hooks import DistillDefense, build_defense
    torch.manual_seed(0)
    teacher = to_layout(build_model(teacher_arch, 10, 3, (32, 32)).to(device)).eval().requires_grad_(False)
    config = DataFreeConfig(method="zskt", iterations=1000, batch_size=batch, student_steps=student_steps)
    out: dict = {"batch": batch, "student_steps": student_steps, "numerics": numerics_record(device)}
    runs = {}
    for variant in ("none", "sv", "abd"):
        defense = build_defense(variant, "zskt", vaccine=ShufflingVaccineConfig(tail_test=False))
        student = build_model(student_arch, 10, 3, (32, 32)).to(device)
        runs[variant] = DataFreeRun(teacher, student, (3, 32, 32), config, device, defense or DistillDefense())
    seconds: dict[str, list[float]] = {v: [] for v in runs}
    index = {"none": 0, "sv": 0, "abd": 999}  # abd at its last iteration: SR's phase is on
    for variant, run in runs.items():
        run.iteration(index[variant])  # warm-up
    for _ in range(iterations):
        for variant, run in runs.items():
            deadline.check()
            seconds[variant].append(timed(lambda r=run, v=variant: r.iteration(index[v]), device))
    out["seconds_per_iteration"] = {"plain": statistics.median(seconds["none"]),
                                    "abd_vaccine": statistics.median(seconds["sv"]),
                                    "abd_sr_phase": statistics.median(seconds["abd"])}
    before = dict(runs["none"].seconds)
    runs["none"].iteration(1)
    synchronize(device)
    student_step = (runs["none"].seconds["student"] - before["student"]) / student_steps
    bare = train_step_rate(student_arch, batch, 10, device, teacher=teacher_arch)
    out["student_step_ratio_to_bare_kd_step"] = (batch / student_step) / bare
    print(f"  zskt: {out['seconds_per_iteration']}", flush=True)
    return out


def _packed_worker(barrier, results, arch: str, teacher: str, batch: int, seconds: float, precision: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    with use_numerics(Numerics(precision)):
        step = make_train_step(arch, batch, device, teacher=teacher)
        for _ in range(3):  # CUDA context and kernel choice before the common start
            step()
        synchronize(device)
        barrier.wait()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(5):
                step()
            done += 5 * batch
        synchronize(device)
    results.put(done / (time.perf_counter() - started))


def packed_runs(counts: list[int], arch: str, teacher: str, batch: int, seconds: float, precision: str,
                deadline: Deadline) -> dict:
    """Total images/s of N processes training at once on the device (each a KD step of ``arch``
    from ``teacher``, ``batch`` images, for ``seconds`` after a common start) for each N in ``counts``."""
    context = multiprocessing.get_context("spawn")
    out = {"arch": arch, "teacher": teacher, "batch": batch, "seconds": seconds, "total_images_per_s": {}}
    for n in counts:
        deadline.check()
        barrier, results = context.Barrier(n), context.Queue()
        workers = [context.Process(target=_packed_worker, args=(barrier, results, arch, teacher, batch, seconds,
                                                                precision)) for _ in range(n)]
        for w in workers:
            w.start()
        rates = [results.get(timeout=max(30.0, deadline.left() + 60)) for _ in workers]
        for w in workers:
            w.join()
        out["total_images_per_s"][n] = sum(rates)
        print(f"  {n} packed: {sum(rates):.0f} img/s in total", flush=True)
    one = out["total_images_per_s"].get(counts[0])
    out["throughput_over_one"] = {n: v / one for n, v in out["total_images_per_s"].items()} if one else {}
    return out


def teacher_to_accuracy(data, test, arch: str, epochs: int, batch: int, lr: float, target_acc: float,
                        device: torch.device, deadline: Deadline) -> dict:
    """Train a BadNets-grid teacher (10% poisons replaced, target 0) with one-cycle SGD; seconds and
    ACC/ASR after every epoch, and the seconds until ACC first reached ``target_acc``."""
    from kdbackdoor.attacks.teacher_poisoning import PoisonConfig, poison_training_set
    from kdbackdoor.training import cross_entropy_loss, fit
    from kdbackdoor.triggers import build_trigger
    trigger = build_trigger("badnets-grid", image_shape=data.image_shape)
    poisoned = poison_training_set(data, trigger, PoisonConfig(target=0, rate=0.1))
    config = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, label_smoothing=0.1, seed=0)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10).to(device)
    rows: list[dict] = []
    started = time.perf_counter()

    def on_epoch(epoch: int, row: dict) -> None:
        rows.append({"epoch": epoch, "seconds": time.perf_counter() - started, "acc": row.get("test_acc"),
                     "asr": row.get("test_asr")})
        print(f"  teacher epoch {epoch}: {rows[-1]}", flush=True)
        deadline.check()
    note = None
    with tempfile.TemporaryDirectory() as out:
        try:
            fit(model, poisoned, config, out, loss_fn=cross_entropy_loss(0.1), test=test, device=device,
                progress=False, on_epoch_end=on_epoch, trigger=trigger, target=0)
        except OutOfTime:
            note = f"stopped after epoch {len(rows)} of {epochs}: the section's time was spent"
    reached = next((r for r in rows if r["acc"] is not None and r["acc"] >= target_acc), None)
    return {"arch": arch, "epochs": epochs, "batch": batch, "lr": lr, "train_images": len(poisoned),
            "history": rows, "target_acc": target_acc, "seconds_to_target": reached["seconds"] if reached else None,
            "epoch_seconds": statistics.median(b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:]))
            if len(rows) > 1 else (rows[0]["seconds"] if rows else None),
            "final": rows[-1] if rows else None, "note": note, "numerics": numerics_record(device)}


def quality(data, test, teacher_arch: str, student_arch: str, teacher_epochs: int, student_epochs: int,
            batch: int, device: torch.device, deadline: Deadline) -> dict:
    """ACC and ASR of a BadNets-grid teacher and of a student distilled from it (dataset KD, λ 0.5,
    T 4) in fp32 and in bf16 (same seeds, same data): the differences bf16 − fp32."""
    from kdbackdoor.attacks.teacher_poisoning import PoisonConfig, poison_training_set
    from kdbackdoor.distill.dataset_kd import distill
    from kdbackdoor.distill.losses import KDConfig
    from kdbackdoor.distill.record import Backdoor
    from kdbackdoor.evaluate import model_metrics
    from kdbackdoor.training import cross_entropy_loss, fit
    from kdbackdoor.triggers import build_trigger
    trigger = build_trigger("badnets-grid", image_shape=data.image_shape)
    poisoned = poison_training_set(data, trigger, PoisonConfig(target=0, rate=0.1))
    out: dict = {"teacher": teacher_arch, "student": student_arch, "teacher_epochs": teacher_epochs,
                 "student_epochs": student_epochs, "train_images": len(data), "test_images": len(test)}
    for precision in ("fp32", "bf16"):
        deadline.check()
        with use_numerics(Numerics(precision)), tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            torch.manual_seed(0)
            teacher = build_model(teacher_arch, num_classes=10).to(device)
            fit(teacher, poisoned, TrainConfig(epochs=teacher_epochs, batch_size=batch, lr=0.2, label_smoothing=0.1,
                                               eval_every=0, seed=0),
                f"{folder}/teacher", loss_fn=cross_entropy_loss(0.1), device=device, progress=False)
            t = model_metrics(teacher, test, trigger=trigger, target=0, device=device)
            deadline.check()
            _, record = distill(teacher, data, test, student_arch,
                                TrainConfig(epochs=student_epochs, batch_size=batch, lr=0.2, eval_every=0, seed=0),
                                KDConfig(kd_lambda=0.5, temperature=4.0), f"{folder}/student", device=device,
                                backdoor=Backdoor(trigger, 0), evaluate_teacher=False, progress=False)
            s = record["metrics"]
            out[precision] = {"teacher_acc": t["acc"], "teacher_asr": t["asr"], "student_acc": s["acc"],
                              "student_asr": s["asr"], "seconds": time.perf_counter() - started}
        print(f"  quality {precision}: {out[precision]}", flush=True)
    out["bf16_minus_fp32"] = {k: out["bf16"][k] - out["fp32"][k]
                              for k in ("teacher_acc", "teacher_asr", "student_acc", "student_asr")}
    return out
