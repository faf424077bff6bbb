"""Neural Cleanse (Wang et al., S&P 2019): reverse-engineer a trigger per class, flag outliers.

For every class t a mask m_t (H, W) and a pattern p_t (C, H, W), both in [0, 1] and
sigmoid-parametrised, are optimised so that the stamped image ``(1 - m_t)·x + m_t·p_t``
(pixel space) is classified as t for clean images x whose label is not t, while an L1
penalty keeps m_t small. A backdoor target needs a much smaller mask than any other class
(the trigger is a shortcut), so its mask norm is a low outlier among the classes.

All classes are optimised together: one (K, H, W) mask tensor, each step runs the model on
K copies of the same clean batch. The penalty weight of each class follows Neural Cleanse's
schedule: it is 0 until the class's trigger first reaches ``success_threshold`` over a round
of ``adjust_every`` steps, then ``init_cost``; after every later round it is multiplied by
``cost_up`` if the round reached the threshold, divided by ``cost_down`` otherwise. The
smallest mask seen with a whole batch at or above the threshold is kept.

Outlier test: anomaly index = |norm − median| / (1.4826 · MAD), MAD being the median absolute
deviation of the K norms (1.4826 makes it a consistent estimator of the standard deviation
for normal data). A class whose norm is below the median with an index above
``anomaly_threshold`` (default 2) is flagged as a suspected target.

The scan uses only clean images and their labels: never a provenance mask nor a test ASR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.data.progress import progress_bar
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.compatibility import check_compatible
from kdbackdoor.numerics import autocast
from kdbackdoor.runtime import Seed, cpu_generator

MAD_CONSISTENCY = 1.4826  # MAD · 1.4826 estimates the standard deviation of normal data
MASK_INIT = 0.2  # initial mask values are uniform in [0, MASK_INIT]


class NeuralCleanseConfig(BaseModel):
    """Knobs of the trigger reverse-engineering (defaults: Neural Cleanse's, shortened for CPUs)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(300, ge=1, description="optimisation steps (each: one batch, all classes)")
    batch_size: int = Field(16, ge=1, description="clean images per step; the model sees K times as many")
    lr: float = Field(0.1, gt=0, description="Adam step on the mask and pattern logits")
    init_cost: float = Field(1e-3, gt=0, description="weight of the mask's L1 norm (pixels) once the "
                             "class's trigger first succeeds")
    success_threshold: float = Field(0.99, gt=0, le=1, description="share of stamped images that must "
                                     "reach the class for a mask to count")
    adjust_every: int = Field(5, ge=1, description="steps between cost adjustments")
    cost_up: float = Field(1.5, gt=1, description="cost multiplier after a successful round")
    cost_down: float = Field(1.5 ** 1.5, gt=1, description="cost divisor after a failed round")
    early_stop_rounds: int = Field(8, ge=0, description="stop once no class's best norm dropped by 1% "
                                   "for this many rounds (0: never stop early)")
    anomaly_threshold: float = Field(2.0, gt=0, description="anomaly index above which a small-norm "
                                     "class is flagged")
    seed: Seed = 0


@dataclass
class NeuralCleanseResult:
    """Per-class outcome of the scan (tensors on CPU, index = class).

    norms: L1 norm of the kept mask, in pixels (sum of mask values over H×W).
    anomaly_index: |norm − median| / (1.4826 · MAD).
    success: share of the scan images whose label is not the class that the kept trigger sends
    to the class. reached: whether a mask met ``success_threshold`` during optimisation (if not,
    the last mask is kept). masks: (K, H, W) in [0, 1]; patterns: (K, C, H, W), pixel [0, 1].
    flagged: suspected target classes, smallest norm first.
    """

    classes: list[str]
    norms: torch.Tensor
    anomaly_index: torch.Tensor
    success: torch.Tensor
    reached: torch.Tensor
    flagged: list[int]
    masks: torch.Tensor
    patterns: torch.Tensor
    steps_run: int
    config: NeuralCleanseConfig

    @property
    def suspected(self) -> int | None:
        """The most suspicious flagged class (smallest norm), or None when nothing is flagged."""
        return self.flagged[0] if self.flagged else None

    def triggers(self) -> torch.Tensor:
        """What each recovered trigger pastes: mask·pattern, (K, C, H, W) pixel [0, 1]."""
        return self.masks[:, None] * self.patterns

    def to_dict(self) -> dict:
        """JSON-ready summary (no masks): per-class rows, the flagged classes and the config."""
        rows = [{"class": index, "name": name, "norm": float(self.norms[index]),
                 "anomaly_index": float(self.anomaly_index[index]), "success": float(self.success[index]),
                 "reached_threshold": bool(self.reached[index]), "flagged": index in self.flagged}
                for index, name in enumerate(self.classes)]
        return {"per_class": rows, "flagged": self.flagged, "suspected": self.suspected,
                "median_norm": float(self.norms.quantile(0.5)), "steps_run": self.steps_run,
                "config": self.config.model_dump()}


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """|norm − median| / (1.4826 · MAD) per entry of ``norms`` (1-D); the median of an even count
    is the mean of the two middle values. With MAD = 0, entries off the median get +inf, the
    others 0."""
    norms = norms.double()
    median = norms.quantile(0.5)
    deviation = (norms - median).abs()
    mad = deviation.quantile(0.5) * MAD_CONSISTENCY
    if mad > 0:
        return deviation / mad
    return torch.where(deviation > 0, torch.tensor(float("inf"), dtype=norms.dtype), torch.zeros_like(norms))


def flag_outliers(norms: torch.Tensor, threshold: float = 2.0) -> list[int]:
    """Classes whose norm is below the median with an anomaly index above ``threshold``,
    smallest norm first."""
    index = anomaly_index(norms)
    low = (norms.double() < norms.double().quantile(0.5)) & (index > threshold)
    return sorted(low.nonzero().flatten().tolist(), key=lambda c: float(norms[c]))


def reverse_engineer_triggers(
    model: torch.nn.Module, data: ImageDataset, config: NeuralCleanseConfig | None = None, *,
    device: torch.device | None = None, progress: bool = False,
) -> NeuralCleanseResult:
    """Run Neural Cleanse on ``model`` with the clean images of ``data`` (labels used, to leave
    each class's own images out of its objective). The model is left as it was (mode, grads)."""
    config = config or NeuralCleanseConfig()
    check_compatible(model, data)
    _check_resolution(model, data)
    num_classes = data.num_classes
    if num_classes < 3:
        raise KDBackdoorError(f"Neural Cleanse compares classes against each other: needs at least 3, "
                              f"{data.name!r} has {num_classes}")
    if len(data.labels.unique()) < 2:
        raise KDBackdoorError(f"{data.name!r}: scan images all belong to one class; use more images")
    device = device or next(model.parameters()).device
    channels, height, width = data.image_shape
    generator = cpu_generator(config.seed)
    # Small random masks (Neural Cleanse: uniform in [0, 1]) grow where the class needs them
    # instead of being eroded from half the image: fewer steps to the same norms.
    mask_logit = torch.logit(MASK_INIT * torch.rand(num_classes, height, width, generator=generator), eps=1e-3)
    pattern_logit = torch.logit(torch.rand(num_classes, channels, height, width, generator=generator), eps=1e-3)
    mask_logit, pattern_logit = mask_logit.to(device).requires_grad_(), pattern_logit.to(device).requires_grad_()
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=config.lr, betas=(0.5, 0.9))

    classes = torch.arange(num_classes, device=device)
    cost = torch.zeros(num_classes, device=device)  # no penalty until a class's trigger first succeeds
    best_norm = torch.full((num_classes,), float("inf"), device=device)
    best_mask = torch.sigmoid(mask_logit).detach().clone()
    best_pattern = torch.sigmoid(pattern_logit).detach().clone()
    reference_norm = best_norm.clone()  # for early stopping
    stalled = torch.zeros(num_classes, dtype=torch.long, device=device)
    round_hits = torch.zeros(num_classes, device=device)
    round_count = torch.zeros(num_classes, device=device)

    steps_run = 0
    with _frozen(model), progress_bar(enabled=progress) as bar:
        task = bar.add_task("neural cleanse", total=config.steps)
        batches = _endless_batches(data, config.batch_size, device, generator)
        for step in range(config.steps):
            x, y = next(batches)
            mask = torch.sigmoid(mask_logit)
            pattern = torch.sigmoid(pattern_logit)
            with autocast(device):
                logits = model(_stamp_every_class(x, mask, pattern)).float().view(num_classes, len(x), -1)
            others = (y[None] != classes[:, None]).float()  # (K, B): images not already of class k
            cross_entropy = F.cross_entropy(logits.flatten(0, 1), classes.repeat_interleave(len(x)),
                                            reduction="none").view(num_classes, len(x))
            counts = others.sum(1).clamp_min(1)
            norm = mask.flatten(1).sum(1)
            loss = ((cross_entropy * others).sum(1) / counts + cost * norm).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            with torch.no_grad():
                hits = ((logits.argmax(-1) == classes[:, None]).float() * others).sum(1)
                met = (hits / counts >= config.success_threshold) & (others.sum(1) > 0)
                better = met & (norm < best_norm)
                best_norm = torch.where(better, norm.detach(), best_norm)
                best_mask[better] = mask.detach()[better]
                best_pattern[better] = pattern.detach()[better]
                round_hits += hits
                round_count += others.sum(1)
            steps_run = step + 1
            bar.advance(task)
            if steps_run % config.adjust_every == 0:
                succeeded = round_hits / round_count.clamp_min(1) >= config.success_threshold
                cost = torch.where(succeeded, cost * config.cost_up, cost / config.cost_down)
                cost = torch.where(succeeded & (cost == 0), torch.full_like(cost, config.init_cost), cost)
                round_hits.zero_()
                round_count.zero_()
                improved = best_norm < 0.99 * reference_norm
                reference_norm = torch.where(improved, best_norm, reference_norm)
                stalled = torch.where(improved, torch.zeros_like(stalled), stalled + 1)
                if (config.early_stop_rounds and bool(torch.isfinite(best_norm).all())
                        and bool((stalled >= config.early_stop_rounds).all())):
                    break

    reached = torch.isfinite(best_norm)
    last_mask, last_pattern = torch.sigmoid(mask_logit).detach(), torch.sigmoid(pattern_logit).detach()
    masks = torch.where(reached[:, None, None], best_mask, last_mask).cpu()
    patterns = torch.where(reached[:, None, None, None], best_pattern, last_pattern).cpu()
    norms = masks.flatten(1).sum(1)
    with _frozen(model):
        success = _success_rates(model, data, masks, patterns, device, config.batch_size)
    return NeuralCleanseResult(
        classes=list(data.classes), norms=norms, anomaly_index=anomaly_index(norms).float(), success=success,
        reached=reached.cpu(), flagged=flag_outliers(norms, config.anomaly_threshold), masks=masks,
        patterns=patterns, steps_run=steps_run, config=config)


def _stamp_every_class(x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """(K·B, C, H, W): the batch ``x`` (B, C, H, W) stamped with each of the K triggers, class-major."""
    weight = masks[:, None, None]  # (K, 1, 1, H, W)
    return ((1 - weight) * x[None] + weight * patterns[:, None]).flatten(0, 1)


@torch.no_grad()
def _success_rates(model, data: ImageDataset, masks: torch.Tensor, patterns: torch.Tensor, device,
                   batch_size: int) -> torch.Tensor:
    """Per class k: share of ``data`` images not of class k that trigger k sends to k."""
    num_classes = len(masks)
    classes = torch.arange(num_classes, device=device)
    masks, patterns = masks.to(device), patterns.to(device)
    hits = torch.zeros(num_classes, device=device)
    counts = torch.zeros(num_classes, device=device)
    for x, y, _ in data.batches(batch_size, device=device):
        with autocast(device):
            predicted = model(_stamp_every_class(x, masks, patterns)).argmax(1).view(num_classes, len(x))
        others = y[None] != classes[:, None]
        hits += ((predicted == classes[:, None]) & others).sum(1)
        counts += others.sum(1)
    return (hits / counts.clamp_min(1)).cpu()


def _check_resolution(model: torch.nn.Module, data: ImageDataset) -> None:
    expected = tuple(getattr(model, "input_size", ()) or ())
    if expected and expected != tuple(data.image_shape[1:]):
        raise KDBackdoorError(
            f"model was built for {expected[0]}x{expected[1]} images but data set {data.name!r} has "
            f"{data.image_shape[1]}x{data.image_shape[2]}; a trigger recovered at another resolution means "
            f"nothing (use --resize {expected[0]} if the model's data was resized)")


def _endless_batches(data: ImageDataset, batch_size: int, device: torch.device, generator: torch.Generator
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (pixels, labels) batches on ``device``, epoch after epoch, in a seeded order."""
    while True:
        for x, y, _ in data.batches(min(batch_size, len(data)), device=device, shuffle=True, generator=generator):
            yield x, y


class _frozen:
    """Within the block the model is in eval mode and its parameters need no gradient."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.training = self.model.training
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for parameter, flag in zip(self.model.parameters(), self.flags):
            parameter.requires_grad_(flag)
        self.model.train(self.training)
