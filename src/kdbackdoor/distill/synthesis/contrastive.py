"""Contrastive Model Inversion (CMI, Fang et al., 2021): generator synthesis that also keeps the
synthetic images *different from each other*.

Each round a freshly initialised generator and a batch of learnable latents are optimised
together for ``synthesis_steps`` Adam steps on

    bn·(BatchNorm statistics) + onehot·CE(teacher(x), y) + adv·(−KL where teacher and student
    agree) + contrastive·InfoNCE + defense term.

InfoNCE: a projection head maps the teacher's penultimate features of each image (x) and of a
random local crop of it to unit vectors; each image must pick its own crop out of the batch's
crops and the memory bank (features of earlier rounds' images), at temperature
``contrastive_temperature``. The head persists across rounds. The round's images join the
pool and their features the bank.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdbackdoor.distill.synthesis.base import SYNTHESIZERS, PooledSynthesizer, SynthesisContext, descend
from kdbackdoor.distill.synthesis.priors import balanced_targets, batchnorm_statistics
from kdbackdoor.distill.synthesis.views import local_crop
from kdbackdoor.models.features import forward_with_features
from kdbackdoor.models.generator import ImageGenerator
from kdbackdoor.numerics import autocast

HEAD_DIM = 128


@SYNTHESIZERS.register("cmi")
class ContrastiveInversion(PooledSynthesizer):
    """CMI synthesis into a growing pool, with a memory bank of teacher features."""

    def __init__(self, context: SynthesisContext) -> None:
        super().__init__(context)
        feature_dim = context.teacher.backbone.fc.in_features
        self.head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(),
                                  nn.Linear(feature_dim, HEAD_DIM)).to(context.device)
        self.bank = torch.empty(0, feature_dim, device=context.device)

    def synthesize(self) -> torch.Tensor:
        ctx, config = self.context, self.context.config
        n = config.synthesis_batch_size
        targets = balanced_targets(n, ctx.num_classes, ctx.rng).to(ctx.device)
        with torch.random.fork_rng(devices=[]):  # the fresh weights come from the run's own seeded stream
            torch.manual_seed(int(torch.randint(2 ** 62, (), generator=ctx.rng)))
            generator = ImageGenerator(config.latent_dim, ctx.image_shape, config.generator_width).to(ctx.device)
        latents = self._latents(n).requires_grad_(True)
        optimizer = torch.optim.Adam([*generator.parameters(), latents, *self.head.parameters()],
                                     lr=config.synthesis_lr, betas=(0.5, 0.999))
        feature = ctx.teacher.feature_name
        ctx.student.eval()
        for _ in range(config.synthesis_steps):
            images = generator(latents)
            with autocast(ctx.device):
                with batchnorm_statistics(ctx.teacher) as bn_terms:  # statistics of whole images only
                    teacher_logits, features = forward_with_features(ctx.teacher, images, [feature])
                _, crop_features = forward_with_features(ctx.teacher, local_crop(images, ctx.rng), [feature])
            loss = (ctx.inversion_terms(images, teacher_logits, bn_terms, targets) + config.contrastive_weight
                    * self._info_nce(features[feature].float(), crop_features[feature].float()))
            descend(optimizer, loss, config.max_grad_norm)
        with torch.no_grad():
            images = generator(latents)
            _, features = forward_with_features(ctx.teacher, images, [feature])
        self._keep(images)
        self.bank = torch.cat([self.bank, features[feature].float()])[-config.bank_size:]
        return loss.detach()

    def _info_nce(self, features: torch.Tensor, crop_features: torch.Tensor) -> torch.Tensor:
        """Each image's projection must match its own crop's among all crops and the bank."""
        n = len(features)
        negatives = self.bank
        if len(negatives) > self.context.config.negatives:
            rows = torch.randperm(len(negatives), generator=self.context.rng)[:self.context.config.negatives]
            negatives = negatives[rows.to(negatives.device)]
        projected = F.normalize(self.head(torch.cat([features, crop_features, negatives])), dim=1)
        anchors, keys = projected[:n], projected[n:]
        similarity = anchors @ keys.T / self.context.config.contrastive_temperature
        return F.cross_entropy(similarity, torch.arange(n, device=similarity.device))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "head": self.head.state_dict(), "bank": self.bank.cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.head.load_state_dict(state["head"])
        self.bank = state["bank"].to(self.bank.device)
