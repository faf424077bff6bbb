"""Optional tracking: what a complete run logs to TensorBoard or MLflow, and the missing-package error.

Neither package is a dependency of the test suite, so both are replaced by recording fakes
installed in ``sys.modules``: the tests check what kdbackdoor hands to them.
"""

import importlib.machinery
import sys
import types
from pathlib import Path

import pytest

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment import tracking
from kdbackdoor.experiment.config import TrackingSection, apply_overrides, validate_config
from kdbackdoor.experiment.runner import run_experiment
from kdbackdoor.experiment.tracking import check_tracking, track_run

RECORD = {
    "run_id": "0123456789ab", "name": "demo", "sweep": "lambda",
    "config": {"distill": {"kd": {"kd_lambda": 0.5}}, "poison": {"source_classes": [2, 3]}},
    "metrics": {"acc": 0.9, "asr": 0.25, "per_class_acc": {"0": 1.0}},
    "teacher_metrics": {"acc": 0.95},
    "baseline_metrics": None,
}
HISTORY = [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "loss": 0.3}, {"epoch": 3, "test_acc": 0.8}]


class FakeMlflow(types.ModuleType):
    """Records the calls kdbackdoor makes to ``mlflow``."""

    def __init__(self):
        super().__init__("mlflow")
        self.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)  # found as installed
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self
        return record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_mlflow(monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    return fake


class FakeSummaryWriter:
    instances = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.hparams = log_dir, [], None
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_hparams(self, params, metrics, run_name):
        self.hparams = (params, metrics, run_name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_mlflow_gets_params_headline_metrics_and_the_accuracy_curve(fake_mlflow, tmp_path):
    track_run(TrackingSection(backend="mlflow"), tmp_path, RECORD, HISTORY)
    calls = {name: (args, kwargs) for name, args, kwargs in fake_mlflow.calls}
    assert calls["set_tracking_uri"][0] == ((tmp_path / "mlruns").resolve().as_uri(),)  # a local file store
    assert calls["set_experiment"][0] == ("lambda",)  # the sweep names the experiment
    assert calls["start_run"][1] == {"run_name": "0123456789ab"}
    params = calls["log_params"][0][0]
    assert params == {"distill.kd.kd_lambda": "0.5", "poison.source_classes": "[2, 3]"}
    metrics = calls["log_metrics"][0][0]
    assert metrics == {"student.acc": 0.9, "student.asr": 0.25, "student.per_class_acc.0": 1.0, "teacher.acc": 0.95}
    curve = [(args, kwargs) for name, args, kwargs in fake_mlflow.calls if name == "log_metric"]
    assert curve == [(("student_test_acc", 0.5), {"step": 1}), (("student_test_acc", 0.8), {"step": 3})]


def test_tensorboard_gets_the_curve_and_hparams_in_the_chosen_folder(monkeypatch, tmp_path):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeSummaryWriter.instances.clear()
    track_run(TrackingSection(backend="tensorboard", dir=str(tmp_path / "tb")), tmp_path, RECORD, HISTORY)
    (writer,) = FakeSummaryWriter.instances
    assert Path(writer.log_dir) == tmp_path / "tb" / "0123456789ab"
    assert writer.scalars == [("student/test_acc", 0.5, 1), ("student/test_acc", 0.8, 3)]
    params, metrics, _ = writer.hparams
    assert params["distill.kd.kd_lambda"] == "0.5" and metrics["student.asr"] == 0.25


def test_none_logs_nothing(fake_mlflow, tmp_path):
    track_run(TrackingSection(), tmp_path, RECORD, HISTORY)
    assert fake_mlflow.calls == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_missing_package_is_named_before_any_work(backend, monkeypatch, tmp_path):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KDBackdoorError, match=f"needs the {backend} package"):
        check_tracking(TrackingSection(backend=backend))
    config = validate_config(apply_overrides({"name": "t", "data": {"dataset": "digits"}},
                                             {"tracking.backend": backend}))
    with pytest.raises(KDBackdoorError, match=f"pip install {backend}"):
        run_experiment(config, tmp_path, progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_complete_run_is_tracked(fake_mlflow, tmp_path):
    fast = {"epochs": 1, "batch_size": 64, "lr": 0.05, "crop_padding": 0, "hflip": False, "eval_every": 0}
    config = validate_config({"name": "tracked", "data": {"dataset": "digits", "test_subset": 200},
                              "teacher": {"train": fast}, "distill": {"train": fast, "subset": 300},
                              "tracking": {"backend": "mlflow"}})
    record = run_experiment(config, tmp_path, progress=False)
    calls = {name: args for name, args, _ in fake_mlflow.calls}
    assert calls["set_experiment"] == ("tracked",)
    assert calls["log_metrics"][0]["student.acc"] == record["metrics"]["acc"]
