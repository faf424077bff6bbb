"""The interface every data-free image synthesiser implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from kdbackdoor.distill.hooks import DistillDefense
from kdbackdoor.distill.synthesis.pool import SyntheticPool
from kdbackdoor.distill.synthesis.priors import disagreement_where_agreeing
from kdbackdoor.registry import Registry
from kdbackdoor.training import optimizer_step

if TYPE_CHECKING:
    from kdbackdoor.distill.data_free_config import DataFreeConfig


@dataclass
class SynthesisContext:
    """What a synthesiser works with.

    ``logit_loss(student_logits, teacher_logits)`` is the method's per-sample distillation loss
    (N,); synthesisers that chase disagreement maximise it. ``rng`` drives every random draw.
    """

    teacher: torch.nn.Module
    student: torch.nn.Module
    image_shape: tuple[int, int, int]
    num_classes: int
    config: "DataFreeConfig"
    device: torch.device
    defense: DistillDefense
    logit_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rng: torch.Generator

    def defense_term(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | float:
        """The defense's synthesis term for these images, or 0."""
        term = self.defense.synthesis_loss(images, teacher_logits)
        return 0.0 if term is None else term

    def inversion_terms(self, images: torch.Tensor, teacher_logits: torch.Tensor, bn_terms: list[torch.Tensor],
                        targets: torch.Tensor) -> torch.Tensor:
        """The terms model inversion methods share: bn·BatchNorm statistics + onehot·CE to the
        targets + adv·(−KL where teacher and student agree) + the defense's term."""
        config = self.config
        loss = (config.bn_weight * torch.stack(bn_terms).sum()
                + config.onehot_weight * F.cross_entropy(teacher_logits.float(), targets)
                + self.defense_term(images, teacher_logits))
        if config.adv_weight > 0:
            loss = loss + config.adv_weight * disagreement_where_agreeing(self.student(images), teacher_logits)
        return loss


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_grad_norm: float = 0.0) -> None:
    """One optimiser step on ``loss`` (gradient norm clipped to ``max_grad_norm`` when > 0)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(optimizer, max_grad_norm)


class Synthesizer(ABC):
    """Makes pixel images ([0, 1], (N, C, H, W)) for the student to learn the teacher from.

    Each outer iteration calls ``synthesize`` once (one synthesis round), then ``sample`` for
    every student step.
    """

    def __init__(self, context: SynthesisContext) -> None:
        self.context = context

    @abstractmethod
    def synthesize(self) -> torch.Tensor:
        """Run one synthesis round; return its final loss."""

    @abstractmethod
    def sample(self, n: int) -> torch.Tensor:
        """``n`` images for one student step (no gradient to the synthesiser)."""

    @abstractmethod
    def latest(self) -> torch.Tensor:
        """The most recently synthesised images (for pictures of what the method makes)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Resumable state."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` gave."""

    def _latents(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.context.config.latent_dim, generator=self.context.rng).to(self.context.device)


class PooledSynthesizer(Synthesizer):
    """A synthesiser whose rounds add images to a ``SyntheticPool`` the student samples from."""

    def __init__(self, context: SynthesisContext) -> None:
        super().__init__(context)
        self.pool = SyntheticPool(context.image_shape, context.config.pool_size, context.device)
        self._latest = torch.empty(0)

    def _keep(self, images: torch.Tensor) -> None:
        self.pool.add(images)
        self._latest = images.detach()

    def sample(self, n: int) -> torch.Tensor:
        return self.pool.sample(n, self.context.rng)

    def latest(self) -> torch.Tensor:
        return self._latest

    def state_dict(self) -> dict:
        return {"pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pool.load_state_dict(state["pool"])
        self._latest = self.pool.images[-self.context.config.synthesis_batch_size:].float() / 255


SYNTHESIZERS: Registry[type[Synthesizer]] = Registry("data-free method")
"""The synthesiser of each data-free method; ``@SYNTHESIZERS.register("name")`` adds one (its
defaults go in ``kdbackdoor.distill.data_free_config.METHOD_DEFAULTS``)."""
