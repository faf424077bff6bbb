"""Property-based fuzzing of the typed configs and of the command line's options.

Configs: whatever values are thrown at them, a config that is accepted holds only finite
values inside every declared bound, and a rejection names only fields that were set.
CLI: an invalid value for any option ends in exit code 2 with a message that names the option
(or the value), no traceback and no output folder, before any work starts.
"""

from __future__ import annotations

import itertools
import math

import annotated_types
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from kdbackdoor.attacks.distill_poisoning import DistillPoisonConfig
from kdbackdoor.attacks.engines import ENGINES
from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
from kdbackdoor.defenses.neural_cleanse import NeuralCleanseConfig
from kdbackdoor.defenses.robust_kd import RobustKDConfig
from kdbackdoor.defenses.self_retrospection import SelfRetrospectionConfig
from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccineConfig
from kdbackdoor.distill.data_free_config import DataFreeConfig
from kdbackdoor.distill.losses import KDConfig
from kdbackdoor.models import available_architectures
from kdbackdoor.training import TrainConfig
from kdbackdoor.triggers.registry import available_triggers
from reliability_support import record_outcome, run_cli

FUZZ_CONFIGS = settings(max_examples=100, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.too_slow])
FUZZ_CLI = settings(FUZZ_CONFIGS, max_examples=60,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ANY_VALUE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.0, 1.0, 0.5, 1e-12, 2**63, float("nan"), float("inf"), float("-inf")]),
    st.text(max_size=6), st.booleans(), st.none(), st.lists(st.integers(-3, 12), max_size=3),
)


def _bounds(model: type[BaseModel], name: str) -> list:
    return [m for m in model.model_fields[name].metadata
            if isinstance(m, (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt))]


def _within(value, bound) -> bool:
    if isinstance(bound, annotated_types.Ge):
        return value >= bound.ge
    if isinstance(bound, annotated_types.Gt):
        return value > bound.gt
    if isinstance(bound, annotated_types.Le):
        return value <= bound.le
    return value < bound.lt


def check_config(model: type[BaseModel], values: dict) -> None:
    """The property: accepted ⇒ every number finite and in bounds; rejected ⇒ only set fields blamed."""
    try:
        config = model(**values)
    except ValidationError as exc:
        blamed = {error["loc"][0] for error in exc.errors() if error["loc"]}
        assert blamed <= set(values), (blamed, values)
        return
    for name in model.model_fields:
        value = getattr(config, name)
        if isinstance(value, float):
            assert math.isfinite(value), (name, value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for bound in _bounds(model, name):
                assert _within(value, bound), (name, value, bound)


CONFIGS = [TrainConfig, KDConfig, DistillPoisonConfig, PoisonConfig, DataFreeConfig, ShufflingVaccineConfig,
           SelfRetrospectionConfig, RobustKDConfig, NeuralCleanseConfig, *(e.Params for e in ENGINES.values())]


@pytest.mark.parametrize("model", CONFIGS, ids=lambda m: m.__name__)
def test_configs_accept_only_valid_values(model):
    examples = itertools.count()

    @FUZZ_CONFIGS
    @given(st.dictionaries(st.sampled_from(sorted(model.model_fields)), ANY_VALUE, max_size=4))
    def fuzz(values):
        next(examples)
        check_config(model, values)

    fuzz()
    for name, field in model.model_fields.items():  # a non-finite number alone is always refused
        if field.annotation in (float, "float") or "float" in str(field.annotation):
            for bad in (float("nan"), float("inf")):
                with pytest.raises(ValidationError) as info:
                    model(**{name: bad})
                assert info.value.errors()[0]["loc"][0] == name
    record_outcome("fuzzing", "typed configs (training, KD, poisoning, data-free KD, defenses, engine "
                   "parameters)", model.__name__, count=next(examples))


def not_a_number():
    return st.text(alphabet="abcxyz-+/.e ,", min_size=1, max_size=5).filter(
        lambda t: not _parses_as_float(t))


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def ints(lo=None, hi=None):
    return st.integers(min_value=lo, max_value=hi).map(str)


def floats_outside(lo=None, hi=None, lo_ok=False, hi_ok=False):
    """Numbers (as text) outside the valid range between ``lo`` and ``hi`` (each bound itself valid
    when ``*_ok``), plus nan/inf spellings and non-numbers."""
    parts = [st.sampled_from(["nan", "inf", "-inf", "NaN"]), not_a_number()]
    if lo is not None:
        parts.append(st.floats(max_value=lo, allow_nan=False).filter(lambda v: not (lo_ok and v == lo)).map(repr))
    if hi is not None:
        parts.append(st.floats(min_value=hi, allow_nan=False).filter(lambda v: not (hi_ok and v == hi)).map(repr))
    return st.one_of(parts)


def words_except(*allowed):
    return st.text(alphabet="abcdefgklmnoprstuvwxyz-_", min_size=1, max_size=8).filter(lambda w: w not in allowed)


TRAINING = {
    "--epochs": st.one_of(ints(hi=0), not_a_number()),
    "--batch-size": st.one_of(ints(hi=0), not_a_number()),
    "--lr": floats_outside(lo=0.0),
    "--weight-decay": floats_outside(lo=0.0, lo_ok=True),
    "--schedule": words_except("onecycle", "cosine", "step", "constant"),
    "--label-smoothing": floats_outside(lo=0.0, hi=1.0, lo_ok=True),
    "--crop-padding": ints(hi=-1),
    "--eval-every": ints(hi=-1),
    "--seed": st.one_of(ints(hi=-1), ints(lo=2**63)),
    "--device": words_except("auto", "cpu", "cuda"),
    "--resize": ints(hi=0),
}
COMMANDS = {
    "train-teacher": ({
        **TRAINING,
        "--dataset": words_except("digits", "cifar10", "cifar100", "gtsrb"),
        "--arch": words_except(*available_architectures()),
        "--poison-rate": floats_outside(lo=0.0, hi=1.0),
        "--poison-mode": words_except("replace", "add"),
        "--poison-style": words_except("auto", "dirty", "clean"),
        "--target": ints(hi=-1),
        "--adv-eps": floats_outside(lo=0.0, lo_ok=True),
        "--holdout": floats_outside(lo=0.0, hi=1.0, lo_ok=True),
    }, ["--backdoor", "badnets-square"]),
    "distill": ({
        **TRAINING,
        "--method": words_except("dataset", "ood", "zskt", "dfad", "deepinversion", "cmi"),
        "--kd-lambda": floats_outside(lo=0.0, hi=1.0, lo_ok=True, hi_ok=True),
        "--temperature": floats_outside(lo=0.0),
        "--cutmix": floats_outside(lo=0.0, hi=1.0, lo_ok=True, hi_ok=True),
        "--student-arch": words_except(*available_architectures()),
    }, []),
    "poison-distill": ({
        "--rate": floats_outside(lo=0.0, hi=1.0),
        "--mode": words_except("add", "replace"),
        "--method": words_except("fgsm", "pgd", "cw", "generative"),
        "--eps": st.one_of(not_a_number(), st.just("1/0"), floats_outside(lo=0.0)),
        "--step-size": st.one_of(not_a_number(), floats_outside(lo=0.0)),
        "--steps": ints(hi=0),
        "--norm": words_except("linf", "l2"),
        "--param": st.one_of(words_except(), st.sampled_from(["=3", "bogus=1", "eps=-1", "eps=abc", "steps=0"])),
        "--label-mode": words_except("target", "teacher", "original"),
        "--threshold": floats_outside(lo=0.0, hi=1.0, hi_ok=True),
        "--retries": ints(hi=-1),
        "--target": ints(hi=-1),
        "--batch-size": ints(hi=0),
        "--seed": st.one_of(ints(hi=-1), ints(lo=2**63)),
        "--source-classes": st.sampled_from(["a,b", "1,x", "1.5"]),
        "--device": words_except("auto", "cpu", "cuda"),
        "--dataset": words_except("digits"),
        "--trigger": words_except(*available_triggers()),
    }, []),
}


@pytest.fixture(scope="module")
def digits_teacher_dir(tmp_path_factory):
    """An untrained digits-shaped checkpoint: enough for every check that needs a real teacher."""
    import torch
    from kdbackdoor.models import build_model, save_checkpoint
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fuzz-teacher")
    save_checkpoint(build_model("small-cnn", 10, 1, (8, 8)), folder / "model", classes=[str(i) for i in range(10)],
                    metadata={"dataset": {"spec": "digits", "data_dir": None, "resize": None}})
    return folder


def _mentions(message: str, option: str, value: str) -> bool:
    """The message names the option, or the bad value (or, for --param KEY=VALUE, the key)."""
    name = option.lstrip("-")
    needles = [option, name, name.replace("-", "_"), repr(value), value.split("=")[0].strip() or "="]
    return any(needle and needle in message for needle in needles)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_invalid_cli_values_are_refused_before_any_work(command, tmp_path, digits_teacher_dir):
    options, extra = COMMANDS[command]
    base = {"train-teacher": ["--epochs", "1"],
            "distill": ["--teacher", digits_teacher_dir, "--epochs", "1"],
            "poison-distill": ["--teacher", digits_teacher_dir, "--subset", "40"]}[command]
    runs = itertools.count()

    @FUZZ_CLI
    @given(st.sampled_from(sorted(options)).flatmap(lambda o: st.tuples(st.just(o), options[o])))
    def fuzz(case):
        option, value = case
        out = tmp_path / f"out{next(runs)}"
        code, stdout, stderr = run_cli(command, *base, *extra, "--out", out, "--no-progress", option, value)
        message = " ".join(stderr.split())
        assert code == 2, (option, value, code, stdout[-500:], stderr[-1000:])
        assert "Traceback" not in stderr, stderr
        assert _mentions(message, option, value), (option, value, message)
        assert not out.exists(), (option, value, "left an output folder")

    fuzz()
    record_outcome("fuzzing", "invalid CLI option values (train-teacher, distill, poison-distill)", command,
                   count=next(runs))
