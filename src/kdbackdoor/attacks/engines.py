"""Manipulation engines: make images that a teacher assigns to a target class.

An engine turns a batch of source images (pixel space [0,1], (N,C,H,W)) into poisons for
the distillation-set attack. Every engine optimises *through* a pixel transform (the
trigger), so what is optimised is the teacher's view of the triggered poison, which is what
verification later checks. Engines are built by name with ``build_engine``; each exposes
its parameters as a pydantic model so that the command line, manifests and sweeps share
one definition of names and defaults (chosen for 32 px images, in pixel units).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdbackdoor.attacks.pgd import pgd
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.registry import Registry

PixelTransform = Callable[[torch.Tensor], torch.Tensor]


class EngineParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Engine(ABC):
    """Crafts poisons: ``craft(teacher, x, targets, transform, generator) -> x'`` in [0,1]."""

    name: ClassVar[str]  # set by @register_engine
    Params: ClassVar[type[EngineParams]]
    stops_early: ClassVar[bool] = False  # honours craft's stop_probability

    def __init__(self, **params) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise KDBackdoorError(f"engine {self.name}: {problems}") from None

    @abstractmethod
    def craft(self, teacher: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor,
              transform: PixelTransform, generator: torch.Generator,
              stop_probability: float | None = None) -> torch.Tensor:
        """Poisons for source images ``x``: the teacher should label ``transform(x')`` as ``targets``.

        The teacher is in eval mode and gets no parameter gradients; ``generator`` (CPU)
        drives every random choice, so a retry with the same generator draws anew. An engine
        with ``stops_early`` stops optimising an image once the teacher gives its target at
        least ``stop_probability``; the others ignore it.
        """

    def config(self) -> dict:
        return {"name": self.name, **self.params.model_dump()}


ENGINES: Registry[type[Engine]] = Registry("engine", names_items=True)
register_engine = ENGINES.register
"""Class decorator: ``@register_engine("name")`` makes the engine buildable as ``name`` (configs, ``--method``)."""


class FGSMParams(EngineParams):
    eps: float = Field(8 / 255, gt=0, le=1, description="L∞ step (pixel units)")


@register_engine("fgsm")
class FGSM(Engine):
    """Targeted fast gradient sign method: one signed step of size ``eps`` towards the target."""

    Params = FGSMParams

    def craft(self, teacher, x, targets, transform, generator, stop_probability=None):
        p = self.params
        return pgd(teacher, x, targets, eps=p.eps, step_size=p.eps, steps=1, targeted=True,
                   random_start=False, transform=transform)


class PGDParams(EngineParams):
    eps: float = Field(8 / 255, gt=0, description="radius (pixel units; L2 radius for norm=l2)")
    step_size: float = Field(2 / 255, gt=0)
    steps: int = Field(20, ge=1)
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = True


@register_engine("pgd")
class PGD(Engine):
    """Targeted projected gradient descent (L∞ or L2)."""

    Params = PGDParams
    stops_early = True

    def craft(self, teacher, x, targets, transform, generator, stop_probability=None):
        p = self.params
        return pgd(teacher, x, targets, eps=p.eps, step_size=p.step_size, steps=p.steps, norm=p.norm,
                   targeted=True, random_start=p.random_start, generator=generator, transform=transform,
                   stop_probability=stop_probability)


class CWParams(EngineParams):
    c: float = Field(1.0, gt=0, description="initial weight of the classification term")
    steps: int = Field(100, ge=1, description="Adam steps per search round")
    # lr 0.01 / kappa 0 (the paper's choice for minimal perturbations) stops at the decision
    # boundary, where P(target) is near 1/2 and verification at P >= 0.5 drops most poisons
    lr: float = Field(0.05, gt=0, description="Adam step size in tanh space")
    confidence: float = Field(5.0, ge=0, description="required logit margin (kappa) of the target over the others")
    search_steps: int = Field(3, ge=1, description="binary-search rounds over c")


@register_engine("cw")
class CW(Engine):
    """Targeted Carlini-Wagner L2: minimise ||x'-x||² + c·max(max_{i≠t} z_i − z_t, −κ).

    x' = (tanh(w)+1)/2 keeps pixels in [0,1]. ``c`` is searched per image: halved towards
    the last success, grown tenfold while there is none. The smallest successful
    perturbation is kept; images never succeeding return their last iterate.
    """

    Params = CWParams

    def craft(self, teacher, x, targets, transform, generator, stop_probability=None):
        p = self.params
        x = x.detach()
        n = len(x)
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), float("inf"), device=x.device)
        c = torch.full((n,), p.c, device=x.device)
        best = x.clone()
        best_dist = torch.full((n,), float("inf"), device=x.device)
        w0 = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        for _ in range(p.search_steps):
            w = w0.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=p.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            last = x
            for _ in range(p.steps):
                adv = (torch.tanh(w) + 1) / 2
                logits = teacher(transform(adv)).float()
                margin = _target_margin(logits, targets)
                dist = (adv - x).flatten(1).pow(2).sum(1)
                loss = (dist + c * (margin + p.confidence).clamp_min(0)).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    hit = margin + p.confidence < 0  # a success clears the margin kappa, not just the boundary
                    improved = hit & (dist < best_dist)
                    best[improved] = adv.detach()[improved]
                    best_dist[improved] = dist[improved]
                    succeeded |= hit
                    last = adv.detach()
            with torch.no_grad():
                upper = torch.where(succeeded, torch.minimum(upper, c), upper)
                lower = torch.where(succeeded, lower, torch.maximum(lower, c))
                c = torch.where(upper.isfinite(), (lower + upper) / 2, c * 10)
        never = best_dist.isinf()
        best[never] = last[never]
        return best


def _target_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """max over non-target logits minus the target logit (< 0 when the target wins)."""
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return others.max(1).values - target_logit


class GenerativeParams(EngineParams):
    steps: int = Field(200, ge=1, description="Adam steps on the latent")
    lr: float = Field(0.05, gt=0)
    similarity: float = Field(1.0, ge=0, description="weight of the mean squared distance to the source image")
    prior: float = Field(0.01, ge=0, description="weight of the latent's mean square (keeps z typical)")


@register_engine("generative")
class Generative(Engine):
    """Search a generator's latent so that the teacher labels the (triggered) output as the target.

    loss = CE(teacher(transform(G(z))), t) + similarity·mean((G(z) − x)²) + prior·mean(z²);
    z starts from a seeded standard normal draw. ``generator_model`` maps latents
    (N, latent_dim) to pixel images [0,1] of the source images' shape.
    """

    Params = GenerativeParams

    def __init__(self, generator_model: torch.nn.Module | None = None, **params) -> None:
        super().__init__(**params)
        if generator_model is None:
            raise KDBackdoorError("the generative engine needs a generator (--generator CKPT)")
        self.generator_model = generator_model.eval()
        self.latent_dim = int(getattr(generator_model, "latent_dim"))
        for parameter in self.generator_model.parameters():
            parameter.requires_grad_(False)

    def craft(self, teacher, x, targets, transform, generator, stop_probability=None):
        p = self.params
        z = torch.randn(len(x), self.latent_dim, generator=generator).to(x.device).requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=p.lr)
        for _ in range(p.steps):
            image = self.generator_model(z)
            if image.shape != x.shape:
                raise KDBackdoorError(f"generator makes images of shape {tuple(image.shape[1:])}, "
                                      f"the data set has {tuple(x.shape[1:])}")
            loss = (F.cross_entropy(teacher(transform(image)).float(), targets)
                    + p.similarity * (image - x).pow(2).mean() + p.prior * z.pow(2).mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return self.generator_model(z).clamp(0, 1)


EARLY_EXIT_ENGINES = ", ".join(name for name, engine in ENGINES.items() if engine.stops_early)
"""Names of the engines that honour ``stop_probability`` (early exit), for messages."""


def build_engine(name: str, generator_model: torch.nn.Module | None = None, **params) -> Engine:
    """The engine ``name`` (fgsm, pgd, cw, generative) with ``params`` (unknown names refused)."""
    engine = ENGINES[name]
    if engine is Generative:
        return Generative(generator_model, **params)
    return engine(**params)


def describe_engines() -> str:
    """Every engine with its parameters and defaults, one line each (for --help and docs)."""
    lines = []
    for name, engine in ENGINES.items():
        fields = ", ".join(f"{key}={_fmt(field.default)}" for key, field in engine.Params.model_fields.items())
        lines.append(f"{name}: {fields}")
    return "\n".join(lines)


def _fmt(value) -> str:
    """Floats that are whole 8-bit levels print as fractions (8/255), others compactly."""
    if isinstance(value, float):
        levels = value * 255
        if 0 < value < 1 and abs(levels - round(levels)) < 1e-9:
            return f"{round(levels)}/255"
        return f"{value:g}"
    return str(value)
