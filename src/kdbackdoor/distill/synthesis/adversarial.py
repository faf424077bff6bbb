"""Adversarial generator synthesis (ZSKT, DFAD): a generator chases teacher/student disagreement.

Each round the generator takes ``synthesis_steps`` Adam steps that *increase* the method's
distillation loss on its images; the student then learns on fresh images from it. Nothing
is stored: every student batch is new.
"""

from __future__ import annotations

import torch

from kdbackdoor.distill.synthesis.base import SYNTHESIZERS, SynthesisContext, Synthesizer, descend
from kdbackdoor.models.generator import ImageGenerator
from kdbackdoor.numerics import autocast


@SYNTHESIZERS.register("zskt")
@SYNTHESIZERS.register("dfad")
class AdversarialGenerator(Synthesizer):
    """ZSKT / DFAD synthesis; ``generator`` is the model saved with the run."""

    def __init__(self, context: SynthesisContext) -> None:
        super().__init__(context)
        config = context.config
        teacher = context.teacher
        self.generator = ImageGenerator(config.latent_dim, context.image_shape, config.generator_width,
                                        output=config.generator_output, mean=teacher.mean.flatten().tolist(),
                                        std=teacher.std.flatten().tolist()).to(context.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.synthesis_lr, fused=True)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, config.iterations)
        self._latest = torch.empty(0)

    def synthesize(self) -> torch.Tensor:
        ctx = self.context
        self.generator.train()
        for _ in range(ctx.config.synthesis_steps):
            x = self.generator(self._latents(ctx.config.synthesis_batch_size))
            with autocast(ctx.device):
                teacher_logits = ctx.teacher(x)
                loss = -ctx.logit_loss(ctx.student(x), teacher_logits).mean() + ctx.defense_term(x, teacher_logits)
            descend(self.optimizer, loss, ctx.config.max_grad_norm)
        self.schedule.step()
        self._latest = x.detach()
        return loss.detach()

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        return self.generator(self._latents(n))

    def latest(self) -> torch.Tensor:
        return self._latest

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
