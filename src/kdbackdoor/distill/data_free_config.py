"""The settings of a data-free distillation run, and each method's defaults.

Methods and their synthesisers: ``kdbackdoor.distill.synthesis``; the loop that uses these
settings: ``kdbackdoor.distill.data_free``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdbackdoor.models.generator import GeneratorOutput
from kdbackdoor.runtime import Seed

# Each method's own settings; every field not named here takes COMMON_DEFAULTS.
METHOD_DEFAULTS: dict[str, dict] = {
    "zskt": {"latent_dim": 100, "synthesis_lr": 1e-3, "synthesis_steps": 1, "student_optimizer": "adam",
             "student_lr": 2e-3, "student_steps": 10, "loss": "kl", "temperature": 1.0, "attention_beta": 250.0,
             "max_grad_norm": 5.0},
    "dfad": {"latent_dim": 256, "synthesis_lr": 1e-3, "synthesis_steps": 1, "student_optimizer": "sgd",
             "student_lr": 0.1, "student_steps": 5, "loss": "l1", "temperature": 1.0},
    "deepinversion": {"synthesis_lr": 0.05, "synthesis_steps": 2000, "synthesis_batch_size": 256,
                      "student_steps": 2000, "bn_weight": 10.0, "onehot_weight": 1.0, "tv_weight": 1e-3,
                      "l2_weight": 0.0, "adv_weight": 0.0, "checkpoint_every": 1},
    "cmi": {"latent_dim": 256, "synthesis_lr": 1e-3, "synthesis_steps": 200, "synthesis_batch_size": 256,
            "student_steps": 2000, "bn_weight": 1.0, "onehot_weight": 0.5, "adv_weight": 0.5,
            "contrastive_weight": 0.8, "checkpoint_every": 1},
    "fast": {"latent_dim": 256, "synthesis_lr": 2e-3, "latent_lr": 0.015, "synthesis_steps": 5,
             "synthesis_batch_size": 256, "student_steps": 50, "bn_weight": 10.0, "onehot_weight": 0.4,
             "adv_weight": 1.1, "checkpoint_every": 10},
}
COMMON_DEFAULTS: dict = {
    "latent_dim": 256, "student_optimizer": "sgd", "student_lr": 0.1, "loss": "kl", "temperature": 20.0,
    "attention_beta": 0.0, "bn_weight": 0.0, "onehot_weight": 0.0, "tv_weight": 0.0, "l2_weight": 0.0,
    "adv_weight": 0.0, "contrastive_weight": 0.0, "checkpoint_every": 50, "max_grad_norm": 0.0, "latent_lr": 0.0,
}


class DataFreeConfig(BaseModel):
    """A data-free run. Fields left as None take the method's defaults (see METHOD_DEFAULTS)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal[tuple(METHOD_DEFAULTS)] = "zskt"  # type: ignore[valid-type]
    iterations: int = Field(2000, ge=1, description="outer iterations (each: one synthesis round, then student steps)")
    batch_size: int = Field(128, ge=2, description="images per student step")
    synthesis_batch_size: int | None = Field(None, ge=2, description="images per synthesis round (default: "
                                             "batch_size for zskt/dfad, 256 for deepinversion/cmi)")
    synthesis_steps: int | None = Field(None, ge=1, description="optimisation steps per synthesis round")
    synthesis_lr: float | None = Field(None, gt=0, description="Adam step of the generator (or of the pixels, "
                                       "deepinversion)")
    latent_dim: int | None = Field(None, ge=1)
    latent_lr: float | None = Field(None, ge=0, description="Adam step of the learnable latents (fast)")
    generator_width: int = Field(64, ge=4, description="channels of the generator's first feature map")
    generator_output: GeneratorOutput = Field(
        "batchnorm", description="last layer of the zskt/dfad generator: batchnorm (as ZSKT and ABD: images made in the "
        "teacher's normalised space, then clipped to pixel range) or sigmoid")
    student_lr: float | None = Field(None, gt=0)
    student_optimizer: Literal["adam", "sgd"] | None = None
    student_steps: int | None = Field(None, ge=1, description="student steps per iteration")
    loss: Literal["kl", "l1"] | None = Field(None, description="kl: T²·KL(teacher_T ‖ student_T); l1: mean |Δlogit|")
    temperature: float | None = Field(None, gt=0)
    max_grad_norm: float | None = Field(None, ge=0, description="clip the gradient norm of each synthesis and "
                                        "student step to this (zskt 5, as ZSKT's code; others 0: no clipping)")
    attention_beta: float | None = Field(None, ge=0, description="weight of attention transfer, in ZSKT's "
                                          "convention (against a KL averaged over classes)")
    bn_weight: float | None = Field(None, ge=0, description="BatchNorm-statistics prior (deepinversion, cmi)")
    onehot_weight: float | None = Field(None, ge=0, description="cross-entropy to the round's target classes")
    tv_weight: float | None = Field(None, ge=0, description="total-variation prior (deepinversion)")
    l2_weight: float | None = Field(None, ge=0, description="pixel L2 prior around mid-grey (deepinversion)")
    adv_weight: float | None = Field(None, ge=0, description="teacher/student disagreement term (adaptive "
                                     "deepinversion, cmi)")
    contrastive_weight: float | None = Field(None, ge=0, description="InfoNCE term (cmi)")
    contrastive_temperature: float = Field(0.1, gt=0)
    bank_size: int = Field(40960, ge=1, description="teacher features kept for contrast (cmi)")
    negatives: int = Field(4096, ge=1, description="bank features drawn per step (cmi)")
    pool_size: int = Field(50000, ge=1, description="synthetic images kept (deepinversion, cmi; oldest dropped)")
    eval_every: int = Field(0, ge=0, description="test ACC every N iterations (0: at the end only)")
    checkpoint_every: int | None = Field(None, ge=1, description="save the resumable state every N iterations "
                                         "(default: 50 for zskt/dfad; every round for deepinversion/cmi, whose "
                                         "rounds take minutes)")
    save_samples: bool = Field(False, description="write a PNG grid of the last synthetic images")
    seed: Seed = 0

    @model_validator(mode="after")
    def _fill_method_defaults(self) -> "DataFreeConfig":
        defaults = {**COMMON_DEFAULTS, "synthesis_batch_size": self.batch_size, **METHOD_DEFAULTS[self.method]}
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        return self
