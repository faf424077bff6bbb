"""Self-Retrospection (ABD, Hong et al., ICML 2023): the student unlearns the shortcut it may
have inherited.

At each student step, on the synthetic batch x (pixel [0, 1]):

1. search a *universal* perturbation δ (one (1, C, H, W) tensor for the whole batch) that most
   changes a model's output: ``rounds`` Adam steps (step ``perturbation_lr``) maximising
   KL(model(x) ‖ model(x + δ)), with the teacher (default) or the student as the model;
2. unlearn it: the student minimises L_out = KL(student(x) ‖ student(x̃)), where x̃ carries δ
   on a random ``portion`` of the batch and student(x) is a fixed anchor (no gradient), with
   δ treated as the student's own best perturbation
   δ*(θ) = argmin_δ −KL(student(x) ‖ student(x + δ)) + l2·‖δ‖². The gradient through δ*(θ) is
   the implicit hyper-gradient (``kdbackdoor.defenses.hypergradient``);
3. add the usual distillation gradient on x and take the optimiser step.

It plugs into every KD through the ``student_gradients`` hook: added to each data-free student
step, and to each optimiser step of distillation on a data set (OOD KD).

The perturbed passes run with the student's BatchNorm running statistics preserved. With
``start`` > 0 the defense stays idle for that share of the iterations and then acts as a short
final fine-tuning phase, as in ABD: the student's learning rate restarts at ``phase_lr`` and
decays by cosine to 0 over the phase (with the run's own, nearly finished schedule the
unlearning barely moves the student).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdbackdoor.defenses.hypergradient import implicit_hypergradient
from kdbackdoor.distill.hooks import DistillDefense
from kdbackdoor.models.batchnorm import preserved_batchnorm_statistics
from kdbackdoor.numerics import autocast
from kdbackdoor.runtime import Seed, Stopwatch, cpu_generator


class SelfRetrospectionConfig(BaseModel):
    """Settings of Self-Retrospection (ABD's defaults where it has them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rounds: int = Field(10, ge=1, description="Adam steps of the perturbation search per student step")
    perturbation_lr: float = Field(0.1, gt=0, description="Adam step of the perturbation (pixel units)")
    # ABD's code defaults to the student, but its ZSKT defense sweeps use the teacher, whose strong
    # backdoor makes the search find the trigger; on digits that unlearned far more (docs/abd.md).
    perturb_model: Literal["student", "teacher"] = Field("teacher", description="model whose output the "
                                                         "perturbation changes")
    portion: float = Field(0.02, gt=0, le=1, description="share of the batch that carries the perturbation "
                           "when unlearning (at least one image)")
    inner_lr: float = Field(0.1, gt=0, description="step of the inner problem in the hyper-gradient")
    fixed_point_iterations: int = Field(5, ge=1)
    l2: float = Field(1e-3, ge=0, description="penalty on ‖δ‖² in the inner problem")
    start: float = Field(0.0, ge=0, lt=1, description="share of the iterations before the defense starts")
    phase_lr: float | None = Field(5e-4, gt=0, description="with start > 0: the student's learning rate when the "
                                   "defense starts, cosine-decayed to 0 by the last iteration (ABD restarts its "
                                   "optimiser at 5e-4 for this phase); None keeps the run's schedule")
    seed: Seed = 0


def output_change(changed_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ changed) per sample, batch mean: how much a perturbation moved the output."""
    return F.kl_div(F.log_softmax(changed_logits.float(), 1), F.log_softmax(reference_logits.float(), 1),
                    reduction="batchmean", log_target=True)


class SelfRetrospection(DistillDefense):
    """The student-side half of ABD, as gradients added to every student step."""

    name = "sr"

    def __init__(self, config: SelfRetrospectionConfig | None = None) -> None:
        self.config = config or SelfRetrospectionConfig()
        self._start_student()

    def _start_student(self) -> None:
        self.rng = cpu_generator(self.config.seed)
        self.active = self.config.start == 0
        self.phase_progress: float | None = None  # share of the SR phase done, when it has its own lr
        self.steps = 0
        self.last_change = 0.0
        self.stopwatch = Stopwatch()

    def setup(self, teacher, student, device) -> None:
        self.teacher = teacher
        self._start_student()  # a second student (a baseline) starts afresh

    def on_iteration(self, iteration: int, total: int) -> None:
        first = math.floor(self.config.start * total)
        self.active = iteration >= first
        if self.active and self.config.start > 0 and self.config.phase_lr is not None:
            self.phase_progress = (iteration - first) / (total - first)

    def student_gradients(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          images: torch.Tensor) -> list[torch.Tensor] | None:
        """The hyper-gradient that unlearns the batch's universal perturbation, one per trainable
        parameter of ``student`` (None while idle); in the final phase also sets ``optimizer``'s
        learning rate for this step."""
        if not self.active:
            return None
        with self.stopwatch.timing(images.device), preserved_batchnorm_statistics(student):
            delta = self.search_perturbation(student if self.config.perturb_model == "student" else self.teacher,
                                             images)
            params = [p for p in student.parameters() if p.requires_grad]
            grads = implicit_hypergradient(params, delta, lambda d: self._inner_loss(student, images, d),
                                           lambda d: self._outer_loss(student, images, d),
                                           inner_lr=self.config.inner_lr, iterations=self.config.fixed_point_iterations)
        if self.phase_progress is not None:  # overrides the run's schedule for the whole phase
            for group in optimizer.param_groups:
                group["lr"] = self.config.phase_lr * (1 + math.cos(math.pi * self.phase_progress)) / 2
        self.steps += 1
        return grads

    def search_perturbation(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The universal perturbation (1, C, H, W), pixel units, that most changes ``model`` on ``images``."""
        delta = torch.zeros_like(images[:1], requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=self.config.perturbation_lr)
        # the model's passes autocast; delta, its gradient and Adam's update stay fp32 (see numerics)
        with torch.no_grad(), autocast(images.device):
            reference = model(images)
        for _ in range(self.config.rounds):
            with autocast(images.device):
                loss = -output_change(model(images + delta), reference)
            delta.grad = torch.autograd.grad(loss, delta)[0]  # the model's own gradients stay untouched
            optimizer.step()
        self.last_change = -loss.detach()  # read when recorded, not here: no wait for the device per step
        return delta.detach()

    def _inner_loss(self, student, images, delta) -> torch.Tensor:
        with torch.no_grad():
            reference = student(images)
        return -output_change(student(images + delta), reference) + self.config.l2 * delta.pow(2).sum()

    def _outer_loss(self, student, images, delta) -> torch.Tensor:
        count = max(1, round(self.config.portion * len(images)))
        rows = torch.randperm(len(images), generator=self.rng)[:count].to(images.device)
        mask = torch.zeros(len(images), 1, 1, 1, device=images.device)
        mask[rows] = 1
        with torch.no_grad():  # the clean output is the anchor: only the perturbed one moves (as ABD)
            reference = student(images)
        return output_change(student(images + mask * delta), reference)

    def record(self) -> dict:
        return {"name": self.name, "config": self.config.model_dump(), "steps": self.steps,
                "last_perturbation_change": float(self.last_change),
                "seconds_this_run": self.stopwatch.seconds}

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.steps = state["steps"]
