"""Data-free distillation: the student learns the teacher from synthetic images only.

One loop serves every method; the methods differ in their synthesiser
(``kdbackdoor.distill.synthesis``) and their defaults. Each outer iteration runs one
synthesis round, then ``student_steps`` student steps on images the synthesiser provides.

- ``zskt`` (Zero-Shot Knowledge Transfer, Micaelli & Storkey 2019): adversarial generator;
  KL(teacher ‖ student) plus attention transfer over the stages (β 250); z 100, Adam 1e-3
  (generator) and 2e-3 (student), 1 generator and 10 student steps per iteration.
- ``dfad`` (Data-Free Adversarial Distillation, Fang et al. 2019): adversarial generator,
  L1 between logits; z 256, SGD 0.1 for the student, 5 student steps per generator step.
- ``deepinversion`` (Yin et al. 2020): images optimised against BatchNorm statistics and a
  target class (2000 Adam steps per batch), kept in a pool; KL at T = 20. Adaptive with
  ``adv_weight`` > 0.
- ``cmi`` (Contrastive Model Inversion, Fang et al. 2021): a re-initialised generator and
  learnable latents per round (200 steps), BatchNorm + one-hot + adversarial + contrastive
  terms with a memory bank, growing pool; KL at T = 20.
- ``fast`` (Fast-DFKD, Fang et al. 2022): a meta-learned generator adapted in 5 steps per round
  (``kdbackdoor.distill.synthesis.fast_meta``), growing pool; KL at T = 20.

A defense (``kdbackdoor.distill.hooks.DistillDefense``) may add a synthesis term, weight the
student's samples or replace its step. Training state is saved atomically every
``checkpoint_every`` iterations; ``resume`` continues from it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdbackdoor import stop_points
from kdbackdoor.atomic import atomic_path, write_json
from kdbackdoor.data.augment import augment
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.distill.data_free_config import METHOD_DEFAULTS, DataFreeConfig
from kdbackdoor.distill.hooks import DistillDefense, StudentStep
from kdbackdoor.distill.losses import attention_transfer_loss, kd_divergence
from kdbackdoor.distill.record import MODEL_FILE, RECORD_FILE, Backdoor, backdoor_record, student_metrics
from kdbackdoor.distill.synthesis import SYNTHESIZERS, AdversarialGenerator, PooledSynthesizer, SynthesisContext
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.image_grid import save_image_batch
from kdbackdoor.models import build_model, save_checkpoint
from kdbackdoor.models.compatibility import check_compatible
from kdbackdoor.models.features import forward_with_features
from kdbackdoor.models.generator import save_generator
from kdbackdoor.numerics import autocast, grad_scaler, numerics_record, to_layout
from kdbackdoor.runtime import cpu_generator, seed_everything
from kdbackdoor.state_file import load_tensors_pickle

STATE_FILE = "train_state.pt"
GENERATOR_FILE = "generator/generator.safetensors"  # a subfolder: the run folder holds one model
SAMPLES_FILE = "samples.png"
METHODS = tuple(METHOD_DEFAULTS)


def distill_data_free(
    teacher: torch.nn.Module,
    test: ImageDataset,
    student_arch: str,
    config: DataFreeConfig,
    out_dir: str | Path,
    *,
    device: torch.device,
    backdoor: Backdoor | None = None,
    defense: DistillDefense | None = None,
    evaluate_teacher: bool = True,
    resume: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Distill ``teacher`` into a new ``student_arch`` without data; write the run to ``out_dir``.

    Images have the teacher's channels and input size. Writes ``model.safetensors`` (+
    ``model.json``), ``metrics.json`` (student metrics on ``test`` as in dataset KD, history,
    config, defense record, throughput and wall time of this process (from ``resumed_from_iteration``,
    0 unless resumed); every ``eval_every`` iterations test ACC and, with a
    backdoor, its ASR), the generator for zskt/dfad
    (``generator/generator.safetensors``) and with ``save_samples`` a PNG of the last
    synthetic images. The teacher is frozen. Returns (student, record).
    """
    out_dir = Path(out_dir)
    check_compatible(teacher, test)
    state_path = out_dir / STATE_FILE
    if state_path.exists() and not resume:
        raise KDBackdoorError(f"{out_dir} already holds a training state; pass --resume to continue it, "
                              "or choose another --out")
    image_shape = (teacher.in_channels, *teacher.input_size)
    if tuple(test.image_shape) != image_shape:
        raise KDBackdoorError(f"the teacher was built for {image_shape} images but the test set has {test.image_shape}")
    teacher = to_layout(teacher.to(device)).eval().requires_grad_(False)
    seed_everything(config.seed)
    student = build_model(student_arch, num_classes=teacher.num_classes, in_channels=image_shape[0],
                          input_size=image_shape[1:])
    student = to_layout(student.to(device))
    defense = defense or DistillDefense()
    run = DataFreeRun(teacher, student, image_shape, config, device, defense)
    history: list[dict] = []
    start = 0
    if resume and state_path.exists():
        start, history = run.load(state_path)

    started = time.perf_counter()
    columns = [TextColumn(f"[bold]{config.method} {student_arch}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    metrics = None  # the student's latest measurement; the last one becomes the record's
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("distill", total=config.iterations, completed=start, status="")
        for iteration in range(start, config.iterations):
            loss_synthesis, loss_student = run.iteration(iteration)
            stop_points.reached("data-free-iteration")
            done = iteration + 1
            last = done == config.iterations
            if last or (config.eval_every and done % config.eval_every == 0):
                metrics = student_metrics(student, test, backdoor, device)
                row = {"iteration": done, "synthesis_loss": float(loss_synthesis), "student_loss": float(loss_student),
                       "test_acc": metrics["acc"], "seconds": time.perf_counter() - started}
                if "asr" in metrics:  # so a run shows when the backdoor reaches the student
                    row["test_asr"] = metrics["asr"]
                history.append(row)
                bar.update(task, status=f"student loss {row['student_loss']:.3f} test {row['test_acc']:.1%}"
                           + (f" ASR {row['test_asr']:.1%}" if "test_asr" in row else ""))
            if last or done % config.checkpoint_every == 0:
                run.save(state_path, done, history)
            bar.advance(task)
    student.eval()
    record = {
        "method": config.method, "student_arch": student_arch, "config": config.model_dump(),
        "test": {"name": test.name, "size": len(test)}, "backdoor": backdoor_record(backdoor),
        "defense": defense.record(), "metrics": metrics or student_metrics(student, test, backdoor, device),
        "history": history, "throughput": run.throughput(), "resumed_from_iteration": start,
        "wall_seconds_this_run": time.perf_counter() - started, "device": str(device),
        "numerics": numerics_record(device), **(metadata or {}),
    }
    if evaluate_teacher:
        record["teacher_metrics"] = student_metrics(teacher, test, backdoor, device)
    if isinstance(run.synthesizer, AdversarialGenerator):
        save_generator(run.synthesizer.generator, out_dir / GENERATOR_FILE, metadata={"method": config.method})
    if config.save_samples and len(run.synthesizer.latest()):
        save_image_batch(run.synthesizer.latest()[:64], out_dir / SAMPLES_FILE)
    save_checkpoint(student, out_dir / MODEL_FILE, classes=test.classes, metadata=record)
    write_json(out_dir / RECORD_FILE, record)
    return student, record


class DataFreeRun:
    """Student, optimiser, synthesiser, defense and random state of one data-free run;
    ``iteration(i)`` runs one outer iteration (``distill_data_free`` drives it; benchmarks time it)."""

    def __init__(self, teacher, student, image_shape, config: DataFreeConfig, device, defense: DistillDefense) -> None:
        self.teacher, self.student, self.config, self.device, self.defense = teacher, student, config, device, defense
        if config.student_optimizer == "adam":
            self.optimizer = torch.optim.Adam(student.parameters(), lr=config.student_lr, fused=True)
        else:
            self.optimizer = torch.optim.SGD(student.parameters(), lr=config.student_lr, momentum=0.9,
                                             weight_decay=5e-4, fused=True)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, config.iterations)
        self.rng = cpu_generator(config.seed)
        context = SynthesisContext(teacher, student, image_shape, teacher.num_classes, config, device, defense,
                                   self.logit_loss, self.rng)
        self.synthesizer = SYNTHESIZERS[config.method](context)
        self.stages = (teacher.stage_names, student.stage_names) if config.attention_beta > 0 else None
        self.step = StudentStep(student, teacher, self.optimizer, self.student_loss, config.max_grad_norm,
                                grad_scaler(device))
        self.crop_padding = max(1, image_shape[1] // 8)
        self.seconds = {"synthesis": 0.0, "student": 0.0}
        self.images = {"synthesis": 0, "student": 0}
        defense.setup(teacher, student, device)

    def logit_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The method's per-sample distillation loss (N,)."""
        if self.config.loss == "l1":
            return (student_logits.float() - teacher_logits.float()).abs().mean(1)
        return kd_divergence(student_logits, teacher_logits, self.config.temperature, per_sample=True)

    def student_loss(self, images: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Batch loss of the student on pixel ``images``: weighted mean of the per-sample losses,
        plus β·attention transfer (unweighted)."""
        with autocast(self.device):
            if self.stages is None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
                student_logits = self.student(images)
                attention = 0.0
            else:
                with torch.no_grad():
                    teacher_logits, teacher_features = forward_with_features(self.teacher, images, self.stages[0])
                student_logits, student_features = forward_with_features(self.student, images, self.stages[1])
                # ZSKT averages its KL over classes as well as samples; ours is per sample, so β is
                # scaled by the class count to keep ZSKT's balance (β = 250 means what it means there).
                attention = self.config.attention_beta * self.teacher.num_classes * attention_transfer_loss(
                    [student_features[n] for n in self.stages[1]], [teacher_features[n] for n in self.stages[0]])
        per_sample = self.logit_loss(student_logits, teacher_logits)
        if weights is None:
            return per_sample.mean() + attention
        return (per_sample * weights).sum() / weights.sum().clamp_min(1e-8) + attention

    def iteration(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One synthesis round, then the student steps. Returns (synthesis loss, last student loss)
        as device tensors, read only when logged."""
        self.defense.on_iteration(index, self.config.iterations)
        started = time.perf_counter()
        loss_synthesis = self.synthesizer.synthesize()
        self.seconds["synthesis"] += time.perf_counter() - started
        self.images["synthesis"] += self.config.synthesis_batch_size * self.config.synthesis_steps
        started = time.perf_counter()
        self.student.train()
        for _ in range(self.config.student_steps):
            images = self.synthesizer.sample(self.config.batch_size)
            if isinstance(self.synthesizer, PooledSynthesizer):  # stored images: vary them as real data is varied
                images = augment(images, crop_padding=self.crop_padding, hflip=True, generator=self.rng)
            weights = self.defense.sample_weights(images)
            loss_student = self.defense.student_step(self.step, images, weights)
            if loss_student is None:
                loss_student = self.step.run(images, weights)
        self.schedule.step()
        self.seconds["student"] += time.perf_counter() - started
        self.images["student"] += self.config.batch_size * self.config.student_steps
        return loss_synthesis, loss_student

    def throughput(self) -> dict:
        """Images per second of synthesis steps and of student steps, in this process."""
        return {f"{part}_images_per_s": self.images[part] / self.seconds[part] if self.seconds[part] else None
                for part in self.seconds}

    def save(self, path: Path, iteration: int, history: list[dict]) -> None:
        state = {"iteration": iteration, "history": history, "rng": self.rng.get_state(),
                 "student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "synthesizer": self.synthesizer.state_dict(),
                 "defense": self.defense.state_dict()}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load(self, path: Path) -> tuple[int, list[dict]]:
        state = load_tensors_pickle(path, "data-free training state", "delete it to start over")
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.synthesizer.load_state_dict(state["synthesizer"])
        self.defense.load_state_dict(state["defense"])
        self.rng.set_state(state["rng"])
        return state["iteration"], state["history"]
