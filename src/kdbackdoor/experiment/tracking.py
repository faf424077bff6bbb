"""Optional experiment tracking to local files: TensorBoard event files or an MLflow file store.

Asked for with ``tracking.backend`` (none | tensorboard | mlflow); nothing needs an account
or a network. Each complete run logs its flattened config as parameters, its headline
metrics (fractions in [0, 1]) and its per-epoch test accuracy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.config import TrackingSection
from kdbackdoor.experiment.index import flatten

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
DEFAULT_DIRS = {"tensorboard": "tensorboard", "mlflow": "mlruns"}


def check_tracking(section: TrackingSection) -> None:
    """Raise ``KDBackdoorError`` when the chosen tracker's package is not installed."""
    package = PACKAGES.get(section.backend)
    if package and importlib.util.find_spec(package) is None:
        raise KDBackdoorError(f"tracking.backend: {section.backend} needs the {package} package "
                              f"(pip install {package}), or set tracking.backend=none")


def track_run(section: TrackingSection, results: Path, record: dict, history: list[dict]) -> None:
    """Log a complete run to the chosen tracker (nothing for ``none``)."""
    if section.backend == "none":
        return
    folder = Path(section.dir) if section.dir else Path(results) / DEFAULT_DIRS[section.backend]
    metrics = {key: value for key, value in flatten({"student": record["metrics"],
                                                     "teacher": record.get("teacher_metrics") or {},
                                                     "baseline": record.get("baseline_metrics") or {}}).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    params = {key: str(value) for key, value in flatten(record["config"]).items()}
    curve = [(row["epoch"] if "epoch" in row else row.get("iteration", i + 1), row["test_acc"])
             for i, row in enumerate(history) if "test_acc" in row]
    if section.backend == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(log_dir=str(folder / record["run_id"])) as writer:
            for step, value in curve:
                writer.add_scalar("student/test_acc", value, step)
            writer.add_hparams(params, metrics, run_name=".")
        return
    import mlflow
    mlflow.set_tracking_uri(folder.resolve().as_uri())
    mlflow.set_experiment(record.get("sweep") or record.get("name") or "kdbackdoor")
    with mlflow.start_run(run_name=record["run_id"]):
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for step, value in curve:
            mlflow.log_metric("student_test_acc", value, step=step)
