"""DeepInversion: images optimised directly so the teacher's BatchNorm statistics and a target
class are matched (Yin et al., 2020), optionally *adaptive* (a term that seeks images on
which the student still disagrees with the teacher).

Each round starts ``synthesis_batch_size`` images from noise around mid-grey, takes
``synthesis_steps`` Adam steps on

    bn·Σ_BN (‖μ−μ_BN‖ + ‖σ²−σ²_BN‖) + onehot·CE(teacher(x̃), y) + tv·TV(x) + l2·‖x−½‖²
    + adv·(−KL where teacher and student agree) + defense term,

with x̃ a jittered, flipped view and y balanced random targets, and adds the result to the pool.
"""

from __future__ import annotations

import torch

from kdbackdoor.distill.synthesis.base import SYNTHESIZERS, PooledSynthesizer, descend
from kdbackdoor.distill.synthesis.priors import balanced_targets, batchnorm_statistics, centred_l2, total_variation
from kdbackdoor.distill.synthesis.views import jitter_flip
from kdbackdoor.numerics import autocast


@SYNTHESIZERS.register("deepinversion")
class DeepInversion(PooledSynthesizer):
    """DeepInversion synthesis into a growing pool."""

    def synthesize(self) -> torch.Tensor:
        ctx, config = self.context, self.context.config
        n = config.synthesis_batch_size
        targets = balanced_targets(n, ctx.num_classes, ctx.rng).to(ctx.device)
        start = 0.5 + 0.2 * torch.randn(n, *ctx.image_shape, generator=ctx.rng)
        images = start.clamp(0, 1).to(ctx.device).requires_grad_(True)
        optimizer = torch.optim.Adam([images], lr=config.synthesis_lr, betas=(0.5, 0.99))
        ctx.student.eval()  # the student only judges here: its BatchNorm statistics stay as they are
        for _ in range(config.synthesis_steps):
            view = jitter_flip(images, ctx.rng)
            with autocast(ctx.device), batchnorm_statistics(ctx.teacher) as bn_terms:
                teacher_logits = ctx.teacher(view)
                loss = (ctx.inversion_terms(view, teacher_logits, bn_terms, targets)
                        + config.tv_weight * total_variation(images) + config.l2_weight * centred_l2(images))
            descend(optimizer, loss, config.max_grad_norm)
            with torch.no_grad():
                images.clamp_(0, 1)
        self._keep(images)
        return loss.detach()
