"""Fast data-free synthesis with a meta-learned generator (Fast-DFKD, Fang et al., AAAI 2022).

CMI and DeepInversion spend hundreds or thousands of optimisation steps per round because
each round starts from scratch. Fast-DFKD keeps one *meta* generator whose weights hold the
features that every round's images share, and adapts a copy of it in a few steps per round:

1. copy the meta generator (the fast generator) and draw fresh learnable latents;
2. take ``synthesis_steps`` (default 5) Adam steps on the fast generator (``synthesis_lr``) and
   the latents (``latent_lr``) against bn·(BatchNorm statistics of a jittered view) +
   onehot·CE(teacher, balanced targets) + adv·(−KL where teacher and student agree) + the
   defense's term (the inversion terms DeepInversion and CMI share);
3. add the adapted images to the pool, and move the meta generator towards the adapted
   weights with a first-order (Reptile) meta step: its gradient is θ_meta − θ_fast, applied by
   its own Adam at ``synthesis_lr``.

Simplified against the paper's code: no per-round reset of the generator's first layer, no
momentum on the BatchNorm statistics term, no warm-up rounds, Reptile only (not first-order
MAML), and the toolkit's DCGAN-style generator (sigmoid output).
"""

from __future__ import annotations

import copy

import torch

from kdbackdoor.distill.synthesis.base import SYNTHESIZERS, PooledSynthesizer, SynthesisContext, descend
from kdbackdoor.distill.synthesis.priors import balanced_targets, batchnorm_statistics
from kdbackdoor.distill.synthesis.views import jitter_flip
from kdbackdoor.models.generator import ImageGenerator
from kdbackdoor.numerics import autocast


@SYNTHESIZERS.register("fast")
class FastMetaSynthesizer(PooledSynthesizer):
    """Fast-DFKD synthesis into a growing pool; ``generator`` is the meta generator."""

    def __init__(self, context: SynthesisContext) -> None:
        super().__init__(context)
        config = context.config
        self.generator = ImageGenerator(config.latent_dim, context.image_shape, config.generator_width).to(
            context.device)
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.synthesis_lr,
                                               betas=(0.5, 0.999))

    def synthesize(self) -> torch.Tensor:
        ctx, config = self.context, self.context.config
        n = config.synthesis_batch_size
        targets = balanced_targets(n, ctx.num_classes, ctx.rng).to(ctx.device)
        fast = copy.deepcopy(self.generator)
        latents = self._latents(n).requires_grad_(True)
        optimizer = torch.optim.Adam([{"params": fast.parameters()},
                                      {"params": [latents], "lr": config.latent_lr}],
                                     lr=config.synthesis_lr, betas=(0.5, 0.999))
        ctx.student.eval()
        for _ in range(config.synthesis_steps):
            images = fast(latents)
            view = jitter_flip(images, ctx.rng)
            with autocast(ctx.device), batchnorm_statistics(ctx.teacher) as bn_terms:
                teacher_logits = ctx.teacher(view)
                loss = ctx.inversion_terms(view, teacher_logits, bn_terms, targets)
            descend(optimizer, loss, config.max_grad_norm)
        with torch.no_grad():
            self._keep(fast(latents))
        self.meta_optimizer.zero_grad(set_to_none=True)
        for meta, adapted in zip(self.generator.parameters(), fast.parameters()):
            meta.grad = (meta - adapted).detach()
        self.meta_optimizer.step()
        with torch.no_grad():  # BatchNorm statistics follow the adapted generator
            for meta, adapted in zip(self.generator.buffers(), fast.buffers()):
                meta.copy_(adapted)
        return loss.detach()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
