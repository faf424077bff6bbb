"""Experiment configs: one typed, validated description of a whole run.

A config (YAML on disk) names the data set, the teacher (trained here or loaded, clean or
backdoored), an optional poisoning of the distillation set, the distillation method and
its defense, the evaluation and optional tracking. ``load_config(path, overrides)`` reads
it, applies ``key=value`` overrides on dotted keys (``distill.kd.kd_lambda=1``), and
validates everything before any work starts: an error names the bad key and the allowed
keys or values.

Seeds: ``seed`` seeds every stage; ``teacher.seed``, ``poison.seed`` and ``distill.seed``
override it for one stage (so a sweep over ``distill.seed`` reuses one teacher). The seed
fields of the embedded library configs (``teacher.train``, ``distill.train``) are set from
these and may not be written there.

Numbers may be written as fractions of two numbers (``8/255``); they become floats.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import kdbackdoor.defenses  # noqa: F401  (registers the distillation defenses)
from kdbackdoor.attacks.adba import ADBAConfig
from kdbackdoor.attacks.backweak import BackWeakConfig
from kdbackdoor.attacks.distill_poisoning import DistillPoisonConfig
from kdbackdoor.attacks.engines import EARLY_EXIT_ENGINES, ENGINES
from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
from kdbackdoor.defenses.nad import NADConfig
from kdbackdoor.defenses.self_retrospection import SelfRetrospectionConfig
from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccineConfig
from kdbackdoor.distill.data_free_config import METHOD_DEFAULTS
from kdbackdoor.distill.hooks import DEFENSES as DEFENSE_REGISTRY
from kdbackdoor.distill.losses import KDConfig
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.numerics import Numerics
from kdbackdoor.runtime import Seed
from kdbackdoor.training import TrainConfig

# Method and defense names come from the library's registries (data-free methods:
# ``METHOD_DEFAULTS``; defenses: ``kdbackdoor.distill.hooks.DEFENSES``).
DATASET_METHODS = ("dataset", "ood")
DATA_FREE_METHODS = tuple(METHOD_DEFAULTS)
DISTILL_METHODS = DATASET_METHODS + DATA_FREE_METHODS
DEFENSES = {name: entry.methods for name, entry in DEFENSE_REGISTRY.items()}
"""defense -> the methods it applies to"""
TRACKERS = ("none", "tensorboard", "mlflow")

# Fields that label a run or choose where it runs, not what it computes: not hashed.
UNHASHED = ("name", "device", "runtime", "tracking")
_EMBEDDED_SEEDS = {"teacher": {"train": {"seed"}, "backdoor": {"seed"}, "adba": {"seed"}, "backweak": {"seed"}},
                   "distill": {"train": {"seed"}, "vaccine": {"seed"}, "retrospection": {"seed"}, "nad": {"seed"}}}
# settings section -> the defenses that read it
_DEFENSE_SETTINGS = {section: tuple(name for name, entry in DEFENSE_REGISTRY.items() if section in entry.settings)
                     for section in ("vaccine", "retrospection", "nad")}
_NESTED_KEY = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", re.DOTALL)
_FRACTION = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*/\s*\d+(\.\d*)?\s*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Section):
    """The data set the teacher learns and everything is tested on."""

    dataset: str = Field("digits", description="digits | cifar10 | cifar100 | gtsrb | imagefolder:PATH | npz:PATH")
    data_dir: Optional[str] = Field(None, description="where cifar/gtsrb files are (else the cache/download)")
    resize: Optional[int] = Field(None, ge=1, description="resize images to this many px (square)")
    test_subset: Optional[int] = Field(None, ge=1, description="evaluate on a seeded subset of this many test "
                                       "images (faster; the same subset for every run)")


class TeacherBackdoor(PoisonConfig):
    """A backdoor planted in the teacher's training set (``PoisonConfig`` plus the trigger)."""

    trigger: str = Field("badnets-square", description="trigger spec (see `kdbackdoor triggers list`)")


class TeacherSection(_Section):
    """Train a teacher (cached by its config) or load one (``checkpoint``)."""

    checkpoint: Optional[str] = Field(None, description="load this model instead of training one: a kdbackdoor "
                                      "checkpoint, bare .safetensors/.pt/.pth weights (with arch and num_classes), "
                                      "a timm-layout folder or hf:OWNER/REPO[@REVISION]")
    arch: str = Field("small-cnn", description="architecture (see `kdbackdoor models`); for a checkpoint, given "
                      "only to read bare weights or to check it")
    num_classes: Optional[int] = Field(None, ge=1, description="class count of bare checkpoint weights")
    input_size: Optional[list[int]] = Field(None, min_length=2, max_length=2,
                                            description="[H, W] the checkpoint was trained at (default: its source's)")
    mean: Optional[list[float]] = Field(None, description="checkpoint normalisation mean, pixel [0, 1] space")
    std: Optional[list[float]] = Field(None, description="checkpoint normalisation std")
    train: TrainConfig = Field(default_factory=TrainConfig)
    backdoor: Optional[TeacherBackdoor] = Field(None, description="null trains a clean teacher")
    adba: Optional[ADBAConfig] = Field(None, description="ADBA-class attack: teacher and trigger trained with a "
                                       "shadow student (replaces teacher.train and teacher.backdoor)")
    backweak: Optional[BackWeakConfig] = Field(None, description="BackWeak-class attack: the clean teacher "
                                               "(teacher.train) fine-tuned on a weak trigger")
    adv_model: Optional[str] = Field(None, description="clean model for the clean-label trigger's PGD step")
    holdout: float = Field(0.0, ge=0, lt=1, description="share of the training set kept out as clean holdout")
    seed: Optional[Seed] = Field(None, description="teacher seed (default: the experiment's seed)")

    @model_validator(mode="after")
    def _one_attack(self) -> "TeacherSection":
        given = [name for name in ("backdoor", "adba", "backweak") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"teacher: choose one of backdoor, adba, backweak (got {', '.join(given)})")
        return self


class PoisonSection(DistillPoisonConfig):
    """Poisoning of the distillation set against the teacher (arXiv 2504.21323)."""

    trigger: str = Field("badnets-square", description="trigger spec overlaid on the poisons")
    method: Literal[tuple(ENGINES)] = Field("pgd", description="manipulation engine")
    engine: dict[str, Any] = Field(default_factory=dict, description="engine parameters (pixel units), "
                                   "e.g. {eps: 8/255, steps: 20}; see `kdbackdoor poison-distill --help`")
    generator: Optional[str] = Field(None, description="generator checkpoint for method generative")
    seed: Optional[Seed] = Field(None, description="poisoning seed (default: the experiment's seed)")

    @model_validator(mode="after")
    def _engine_params(self) -> "PoisonSection":
        try:
            ENGINES[self.method].Params(**self.engine)
        except ValidationError as exc:
            raise ValueError(describe_errors(exc, ENGINES[self.method].Params, "engine")) from None
        if self.early_exit and not ENGINES[self.method].stops_early:
            raise ValueError(f"early_exit: not supported by method {self.method} (only by {EARLY_EXIT_ENGINES})")
        return self


class DistillSection(_Section):
    """How the student is distilled, and the defense."""

    method: Literal[DISTILL_METHODS] = Field("dataset", description="dataset: the transfer set with its labels; "
                                             "ood: images of another data set, KL only; zskt, dfad, "
                                             "deepinversion, cmi: data-free")
    defense: Literal[tuple(DEFENSES)] = Field("none", description=" | ".join(  # type: ignore[valid-type]
        f"{name} ({', '.join(entry.kinds)})" if name != "none" else name for name, entry in DEFENSE_REGISTRY.items()))
    student_arch: str = Field("small-cnn", description="student architecture")
    data: Optional[str] = Field(None, description="transfer set spec (default: the data set's train split; "
                                "required for ood)")
    subset: Optional[int] = Field(None, ge=1, description="use a seeded subset of this many transfer images")
    kd: KDConfig = Field(default_factory=KDConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data_free: dict[str, Any] = Field(default_factory=dict, description="data-free parameters (see "
                                      "`kdbackdoor distill --help`), e.g. {iterations: 200}")
    baseline: bool = Field(False, description="also distil on the transfer set without its poisons")
    vaccine: Optional[ShufflingVaccineConfig] = Field(None, description="Shuffling Vaccine settings (defense abd, "
                                                      "sv; null: ABD's defaults)")
    retrospection: Optional[SelfRetrospectionConfig] = Field(None, description="Self-Retrospection settings "
                                                             "(defense abd, sr; null: ABD's defaults)")
    nad: Optional[NADConfig] = Field(None, description="NAD purification settings (defense nad; null: defaults, "
                                     "500 clean images of the data set's train split)")
    seed: Optional[Seed] = Field(None, description="student seed (default: the experiment's seed)")

    @model_validator(mode="after")
    def _consistent(self) -> "DistillSection":
        if self.defense not in ("none",) and self.method not in DEFENSES[self.defense]:
            raise ValueError(f"defense {self.defense!r} applies to methods {', '.join(DEFENSES[self.defense])}, "
                             f"not {self.method!r}")
        for name, defenses in _DEFENSE_SETTINGS.items():
            if getattr(self, name) is not None and self.defense not in defenses:
                raise ValueError(f"distill.{name} configures defense {' or '.join(defenses)}, not {self.defense!r}")
        if self.method == "ood":
            if self.data is None:
                raise ValueError("method ood needs distill.data (the out-of-distribution image set)")
            if self.kd.kd_lambda != 1:
                raise ValueError("method ood distils on images whose labels mean nothing to the teacher: "
                                 "set distill.kd.kd_lambda to 1")
        if self.method in DATA_FREE_METHODS:
            if self.data is not None or self.subset is not None:
                raise ValueError(f"method {self.method} is data-free: distill.data and distill.subset do not apply")
            if "method" in self.data_free or "seed" in self.data_free:
                raise ValueError("set distill.method and distill.seed, not distill.data_free.method/seed")
        elif self.data_free:
            raise ValueError(f"distill.data_free applies to data-free methods, not {self.method!r}")
        return self


class EvaluationSection(_Section):
    """Which backdoor the student's ASR is measured for."""

    trigger: Optional[str] = Field(None, description="trigger spec (default: the poisons', else the teacher's)")
    target: Optional[int] = Field(None, ge=0, description="target class (default: the poisons' or the teacher's)")
    evaluate_teacher: bool = Field(True, description="also record the teacher's ACC/ASR")


class TrackingSection(_Section):
    """Optional experiment tracking (local files only; no account, no network)."""

    backend: Literal[TRACKERS] = "none"
    dir: Optional[str] = Field(None, description="where the TensorBoard logs / MLflow file store go "
                               "(default: RESULTS/tensorboard or RESULTS/mlruns)")


class RuntimeSection(_Section):
    """How the run computes (not what): precision, memory layout, compilation. Not part of the
    run's identity, so a kit resumed on another machine continues the same runs; the record
    says what was used (``environment.numerics``)."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device computes it natively (CUDA, AVX-512 BF16 CPUs), else "
        "fp32; fp16 trains with a dynamic loss scale")
    channels_last: bool = Field(True, description="store convolution weights and batches channels-last (NHWC)")
    compile: bool = Field(False, description="torch.compile the models' forward (minutes of compilation; long runs)")

    def numerics(self) -> Numerics:
        return Numerics(self.precision, self.channels_last, self.compile)


class ExperimentConfig(_Section):
    """A whole experiment, from data to evaluation."""

    name: str = Field("experiment", description="a label for the run (not part of its identity)")
    seed: Seed = Field(0, description="seed of every stage unless the stage sets its own")
    device: str = Field("auto", description="auto (the machine's accelerator when present), cpu, cuda, cuda:N, ...")
    data: DataSection = Field(default_factory=DataSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    poison: Optional[PoisonSection] = Field(None, description="null: the distillation set is not poisoned")
    distill: DistillSection = Field(default_factory=DistillSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)

    @field_validator("teacher", "distill")
    @classmethod
    def _no_embedded_seed(cls, section, info):
        if "seed" in section.train.model_fields_set:
            raise ValueError(f"set {info.field_name}.seed (or seed), not {info.field_name}.train.seed")
        for name in ("vaccine", "retrospection", "nad", "adba", "backweak"):
            settings = getattr(section, name, None)
            if settings is not None and "seed" in settings.model_fields_set:
                raise ValueError(f"set {info.field_name}.seed (or seed), not {info.field_name}.{name}.seed")
        if info.field_name == "teacher" and section.backdoor and "seed" in section.backdoor.model_fields_set:
            raise ValueError("set teacher.seed (or seed), not teacher.backdoor.seed")
        return section

    @model_validator(mode="after")
    def _poison_needs_data(self) -> "ExperimentConfig":
        if self.poison is not None and self.distill.method not in DATASET_METHODS:
            raise ValueError(f"poison: a poisoned distillation set needs method dataset or ood, "
                             f"not {self.distill.method!r} (data-free KD uses no data)")
        if self.distill.baseline and self.poison is None:
            raise ValueError("distill.baseline compares with the unpoisoned set: it needs a poison section")
        return self

    def stage_seed(self, stage: Literal["teacher", "poison", "distill"]) -> int:
        """The seed of ``stage``: its own when set, else the experiment's."""
        section = getattr(self, stage)
        own = section.seed if section is not None else None
        return self.seed if own is None else own

    def to_data(self) -> dict:
        """The config as JSON data that ``validate_config`` reads back (every default filled in;
        the embedded library configs' seeds left out, as they come from the stage seeds)."""
        return self.model_dump(mode="json", exclude=_EMBEDDED_SEEDS)

    def identity(self) -> dict:
        """What determines the run's results (everything but ``UNHASHED``), as JSON data."""
        data = self.to_data()
        return {key: value for key, value in data.items() if key not in UNHASHED}

    def run_id(self) -> str:
        """The run's folder name: 12 hex digits of the hash of ``identity()``."""
        return content_hash(self.identity())[:12]


def content_hash(data: Any) -> str:
    """sha256 (hex) of ``data`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config, apply ``key=value`` overrides, validate. Raises ``KDBackdoorError``."""
    return validate_config(apply_overrides(read_yaml(path), parse_overrides(overrides)), str(path))


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping (empty file: {})."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise KDBackdoorError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise KDBackdoorError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KDBackdoorError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}``; values are parsed as YAML."""
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise KDBackdoorError(f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. distill.kd.kd_lambda=1")
        try:
            parsed[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            parsed[key] = text
    return parsed


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """A copy of ``data`` with each dotted key set (missing or null sections are created)."""
    result = json.loads(json.dumps(data, default=str))
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[:depth + 1])
                raise KDBackdoorError(f"override {dotted}: {where} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return result


def validate_config(data: dict, source: str = "config") -> ExperimentConfig:
    """An ``ExperimentConfig`` from plain data, or a ``KDBackdoorError`` naming each bad key."""
    try:
        return ExperimentConfig(**_fractions(data))
    except ValidationError as exc:
        raise KDBackdoorError(f"{source}: {describe_errors(exc, ExperimentConfig)}") from None
    except TypeError as exc:
        raise KDBackdoorError(f"{source}: {exc}") from None


def _fractions(value: Any) -> Any:
    """Turn strings like ``8/255`` into floats, anywhere in nested data."""
    if isinstance(value, dict):
        return {key: _fractions(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_fractions(item) for item in value]
    if isinstance(value, str) and _FRACTION.match(value):
        numerator, denominator = value.split("/")
        if float(denominator) != 0:
            return float(numerator) / float(denominator)
    return value


def describe_errors(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line naming each bad key (dotted) of ``model`` and, for unknown keys, the allowed ones."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
        key = ".".join(filter(None, [prefix, *loc])) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        nested = _NESTED_KEY.match(message) if error["type"] == "value_error" else None
        if nested:  # a validator's message about a key inside a free-form mapping
            key, message = f"{key}.{nested[1]}", nested[2]
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            message = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """The field names of the section at ``path`` inside ``model`` (empty if not a section)."""
    for part in path:
        field = model.model_fields.get(part)
        section = _section_type(field.annotation) if field is not None else None
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):  # Optional[Section]
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
