"""Data-free distillation with an adversarial generator: ZSKT and DFAD.

No training data: a generator (``kdbackdoor.models.generator.ImageGenerator``, pixel output
[0,1]) makes the images. Each iteration the generator takes ``generator_steps`` steps to
*increase* the teacher/student disagreement on its images, then the student takes
``student_steps`` steps to decrease it on fresh ones.

- ``zskt`` (Zero-Shot Knowledge Transfer, Micaelli & Storkey 2019): disagreement is
  KL(teacher_T ‖ student_T); the student also matches the teacher's spatial attention over
  the stages (weight β). Defaults of the original: z 100, Adam 1e-3 (generator) and 2e-3
  (student), 1 generator step and 10 student steps per iteration, β 250, cosine decay.
- ``dfad`` (Data-Free Adversarial Distillation, Fang et al. 2019): disagreement is the mean
  absolute difference of the logits; z 256, SGD 0.1 for the student, Adam 1e-3 for the
  generator, 5 student steps per generator step.

Training state (student, generator, optimisers, schedules, random state, history) is saved
atomically every ``checkpoint_every`` iterations; ``resume`` continues from it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdbackdoor.atomic import atomic_path, write_json
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.distill.dataset_kd import MODEL_FILE, RECORD_FILE, Backdoor, backdoor_record, student_metrics
from kdbackdoor.distill.losses import attention_transfer_loss, kd_divergence
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.evaluate import accuracy, check_compatible
from kdbackdoor.models import build_model, save_checkpoint
from kdbackdoor.models.features import forward_with_features
from kdbackdoor.models.generator import ImageGenerator, save_generator
from kdbackdoor.runtime import autocast, cpu_generator, seed_everything

STATE_FILE = "train_state.pt"
GENERATOR_FILE = "generator/generator.safetensors"  # a subfolder: the run folder holds one model

METHOD_DEFAULTS = {
    "zskt": {"latent_dim": 100, "generator_lr": 1e-3, "student_lr": 2e-3, "student_optimizer": "adam",
             "student_steps": 10, "attention_beta": 250.0},
    "dfad": {"latent_dim": 256, "generator_lr": 1e-3, "student_lr": 0.1, "student_optimizer": "sgd",
             "student_steps": 5, "attention_beta": 0.0},
}


class GeneratorKDConfig(BaseModel):
    """A generator-based data-free run. Fields left as None take the method's defaults."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["zskt", "dfad"] = "zskt"
    iterations: int = Field(2000, ge=1, description="outer iterations (each: generator steps, then student steps)")
    batch_size: int = Field(128, ge=2)
    latent_dim: int | None = Field(None, ge=1)
    generator_width: int = Field(64, ge=4, description="channels of the generator's first feature map")
    generator_lr: float | None = Field(None, gt=0)
    student_lr: float | None = Field(None, gt=0)
    student_optimizer: Literal["adam", "sgd"] | None = None
    generator_steps: int = Field(1, ge=1)
    student_steps: int | None = Field(None, ge=1)
    attention_beta: float | None = Field(None, ge=0, description="weight of attention transfer (zskt)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term (zskt)")
    eval_every: int = Field(0, ge=0, description="test ACC every N iterations (0: at the end only)")
    checkpoint_every: int = Field(50, ge=1, description="save the resumable state every N iterations")
    seed: int = 0

    @model_validator(mode="after")
    def _fill_method_defaults(self) -> "GeneratorKDConfig":
        for key, value in METHOD_DEFAULTS[self.method].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        return self


def distill_generator(
    teacher: torch.nn.Module,
    test: ImageDataset,
    student_arch: str,
    config: GeneratorKDConfig,
    out_dir: str | Path,
    *,
    device: torch.device,
    backdoor: Backdoor | None = None,
    evaluate_teacher: bool = True,
    resume: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Distill ``teacher`` into a new ``student_arch`` without data; write the run to ``out_dir``.

    The images have the teacher's channels and input size. Writes ``model.safetensors``
    (+ ``model.json``), ``generator/generator.safetensors`` (+ ``.json``) and ``metrics.json`` (student
    metrics on ``test`` as in dataset KD, history, config). The teacher's parameters are
    frozen (``requires_grad_(False)``). Returns (student, record).
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
    teacher = teacher.to(device).eval().requires_grad_(False)
    seed_everything(config.seed)
    student = build_model(student_arch, num_classes=teacher.num_classes, in_channels=image_shape[0],
                          input_size=image_shape[1:]).to(device)
    generator = ImageGenerator(config.latent_dim, image_shape, config.generator_width).to(device)
    run = _Run(teacher, student, generator, config, device)
    history: list[dict] = []
    start = 0
    if resume and state_path.exists():
        start, history = run.load(state_path)

    started = time.perf_counter()
    columns = [TextColumn(f"[bold]{config.method} {student_arch}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("distill", total=config.iterations, completed=start, status="")
        for iteration in range(start, config.iterations):
            loss_g, loss_s = run.iteration()
            done = iteration + 1
            last = done == config.iterations
            if last or (config.eval_every and done % config.eval_every == 0):
                row = {"iteration": done, "generator_loss": loss_g, "student_loss": loss_s,
                       "test_acc": accuracy(student, test, device=device)["acc"],
                       "seconds": time.perf_counter() - started}
                history.append(row)
                bar.update(task, status=f"student loss {loss_s:.3f} test {row['test_acc']:.1%}")
            if last or done % config.checkpoint_every == 0:
                run.save(state_path, done, history)
            bar.advance(task)
    student.eval()
    record = {
        "method": config.method, "student_arch": student_arch, "config": config.model_dump(),
        "test": {"name": test.name, "size": len(test)}, "backdoor": backdoor_record(backdoor),
        "metrics": student_metrics(student, test, backdoor, device), "history": history,
        "wall_seconds_this_session": time.perf_counter() - started, "device": str(device), **(metadata or {}),
    }
    if evaluate_teacher:
        record["teacher_metrics"] = student_metrics(teacher, test, backdoor, device)
    save_generator(generator, out_dir / GENERATOR_FILE, metadata={"method": config.method})
    save_checkpoint(student, out_dir / MODEL_FILE, classes=test.classes, metadata=record)
    write_json(out_dir / RECORD_FILE, record)
    return student, record


class _Run:
    """The models, optimisers and random state of one run, and one iteration of it."""

    def __init__(self, teacher, student, generator, config: GeneratorKDConfig, device) -> None:
        self.teacher, self.student, self.generator, self.config, self.device = teacher, student, generator, config, device
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=config.generator_lr)
        if config.student_optimizer == "adam":
            self.opt_s = torch.optim.Adam(student.parameters(), lr=config.student_lr)
        else:
            self.opt_s = torch.optim.SGD(student.parameters(), lr=config.student_lr, momentum=0.9, weight_decay=5e-4)
        self.sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_g, config.iterations)
        self.sched_s = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_s, config.iterations)
        self.latents = cpu_generator(config.seed)
        self.stages = (teacher.stage_names, student.stage_names) if config.attention_beta > 0 else None

    def _images(self) -> torch.Tensor:
        z = torch.randn(self.config.batch_size, self.config.latent_dim, generator=self.latents)
        return self.generator(z.to(self.device))

    def _disagreement(self, student_logits, teacher_logits) -> torch.Tensor:
        if self.config.method == "zskt":
            return kd_divergence(student_logits, teacher_logits, self.config.temperature)
        return F.l1_loss(student_logits.float(), teacher_logits.float())

    def iteration(self) -> tuple[float, float]:
        """Generator steps (maximise disagreement), then student steps (minimise it)."""
        self.student.train()
        self.generator.train()
        for _ in range(self.config.generator_steps):
            x = self._images()
            with autocast(self.device):
                loss_g = -self._disagreement(self.student(x), self.teacher(x))
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            self.opt_g.step()
        for _ in range(self.config.student_steps):
            with torch.no_grad():
                x = self._images()
            with autocast(self.device):
                loss_s = self._student_loss(x)
            self.opt_s.zero_grad(set_to_none=True)
            loss_s.backward()
            self.opt_s.step()
        self.sched_g.step()
        self.sched_s.step()
        return float(-loss_g.detach()), float(loss_s.detach())

    def _student_loss(self, x: torch.Tensor) -> torch.Tensor:
        if self.stages is None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            return self._disagreement(self.student(x), teacher_logits)
        with torch.no_grad():
            teacher_logits, teacher_features = forward_with_features(self.teacher, x, self.stages[0])
        student_logits, student_features = forward_with_features(self.student, x, self.stages[1])
        attention = attention_transfer_loss([student_features[n] for n in self.stages[1]],
                                            [teacher_features[n] for n in self.stages[0]])
        return self._disagreement(student_logits, teacher_logits) + self.config.attention_beta * attention

    def save(self, path: Path, iteration: int, history: list[dict]) -> None:
        state = {"iteration": iteration, "history": history, "latents": self.latents.get_state(),
                 **{name: getattr(self, name).state_dict()
                    for name in ("student", "generator", "opt_g", "opt_s", "sched_g", "sched_s")}}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load(self, path: Path) -> tuple[int, list[dict]]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name in ("student", "generator", "opt_g", "opt_s", "sched_g", "sched_s"):
            getattr(self, name).load_state_dict(state[name])
        self.latents.set_state(state["latents"])
        return state["iteration"], state["history"]
