"""Distillation losses, defined once.

KD loss (Hinton et al.): ``(1-λ)·CE(student, label) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))``,
KL averaged over the batch ("batchmean"). T² keeps the soft term's gradient scale
independent of the temperature. λ = 0 is plain supervised training, λ = 1 is KL only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdbackdoor.numerics import autocast, layout
from kdbackdoor.training import LossFn


class KDConfig(BaseModel):
    """Weights of the distillation loss."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kd_lambda: float = Field(0.5, ge=0, le=1, description="weight λ of the KL term; 1-λ weighs the label CE")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of both models in the KL term")


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  per_sample: bool = False) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), mean over the batch (or per sample (N,))."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    each = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(1) * temperature ** 2
    return each if per_sample else each.mean()


def kd_loss(teacher: torch.nn.Module, config: KDConfig, teacher_logits: torch.Tensor | None = None,
            push_away: torch.Tensor | None = None, push_weight: float = 0.1) -> LossFn:
    """A ``fit`` loss function for distilling ``teacher`` (kept in eval mode, no gradients).

    ``teacher_logits`` (N, K), when given, are the teacher's logits for every training row,
    computed beforehand (valid only without augmentation); the teacher is then not run.
    With λ = 0 the teacher is never run either. ``push_away`` (N,) bool marks rows on which the
    student is pushed away from the teacher (the Shuffling Vaccine's suspects in OOD KD): the
    KD term is then the batch mean over the other rows − ``push_weight`` · the mean over them of
    min(KD, the KD of a uniform prediction). The cap is ours: ABD's uncapped term has no lower
    bound, and on GTSRB images for a CIFAR-10 teacher (24% marked) the loss went to −10⁵ and NaN
    within 3 epochs; capped, the push stops once the student's answer says nothing of the teacher's.
    """
    lam, temperature = config.kd_lambda, config.temperature
    teacher.eval()

    def loss_fn(model, x, y, idx):
        logits = model(x)
        loss = (1 - lam) * F.cross_entropy(logits, y) if lam < 1 else logits.new_zeros(())
        if lam > 0:
            if teacher_logits is not None:
                target_logits = teacher_logits[idx.to(teacher_logits.device)].to(logits.device)
            else:
                with torch.no_grad():
                    target_logits = teacher(x)
            if push_away is None:
                loss = loss + lam * kd_divergence(logits, target_logits, temperature)
            else:
                divergences = kd_divergence(logits, target_logits, temperature, per_sample=True)
                pushed = push_away[idx.to(push_away.device)].to(logits.device)
                kept = divergences[~pushed].mean() if (~pushed).any() else logits.new_zeros(())
                uninformed = kd_divergence(torch.zeros_like(logits), target_logits, temperature, per_sample=True)
                capped = torch.minimum(divergences, uninformed)
                away = capped[pushed].mean() if pushed.any() else logits.new_zeros(())
                loss = loss + lam * (kept - push_weight * away)
        return loss, logits
    return loss_fn


@torch.no_grad()
def precompute_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, K) of ``model`` in eval mode for uint8 images (N, C, H, W), on their device."""
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device):
        return torch.cat([model(layout(chunk.to(device).float() / 255)).float().to(images.device)
                          for chunk in images.split(batch_size)])


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a feature map (N, C, H, W): mean of squares over channels,
    flattened and L2-normalised per sample -> (N, H·W) (Zagoruyko & Komodakis)."""
    attention = features.float().pow(2).mean(1)
    return F.normalize(attention.flatten(1), dim=1)


def attention_transfer_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> torch.Tensor:
    """Sum over paired stages of the squared difference between attention maps, averaged over
    samples and positions (as Zagoruyko & Komodakis' and ZSKT's code compute it).

    Stages are paired from the last one backwards (as many as the shorter list has); when a
    pair's spatial sizes differ, the larger map is average-pooled to the smaller size.
    """
    total = student_features[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(reversed(student_features), reversed(teacher_features)):
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s = F.adaptive_avg_pool2d(s, size) if s.shape[-2:] != size else s
        t = F.adaptive_avg_pool2d(t, size) if t.shape[-2:] != size else t
        total = total + (attention_map(s) - attention_map(t)).pow(2).mean()
    return total
