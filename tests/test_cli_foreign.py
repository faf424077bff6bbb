"""Foreign weights on the command line: every command that takes a model reads a bare state dict
in another code base's naming with --arch/--num-classes (and --input-size/--mean/--std)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import upstream_models as up
from test_cli import run

WRN = ["--arch", "wrn-16-1", "--num-classes", "3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 3-class npz data set at 32 px and a data-free KD WRN-16-1 saved as a training checkpoint."""
    folder = tmp_path_factory.mktemp("foreign")
    generator = np.random.default_rng(0)
    for split, count in (("train", 36), ("test", 18)):
        labels = np.arange(count) % 3
        images = generator.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        images[:, :8, :8, labels] = 255  # a class cue the teacher need not know
        np.savez(folder / f"{split}.npz", x=images, y=labels, classes=np.array(["a", "b", "c"]))
    teacher = up.randomise(up.DFWideResNet(16, 1, 3))
    torch.save({"epoch": 200, "state_dict": {f"module.{k}": v for k, v in teacher.state_dict().items()}},
               folder / "wrn.pth")
    return folder


def test_evaluate_and_import_model_read_a_data_free_wrn(files, tmp_path, monkeypatch, capsys):
    data = f"npz:{files}"
    code, out, err = run(monkeypatch, capsys, "evaluate", "--model", files / "wrn.pth", *WRN, "--dataset", data,
                         "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert "wrn-16-1, 3 classes, 32x32 px, datafree-wrn names, normalisation: datafree-wrn default" in err
    acc = json.loads((tmp_path / "eval.json").read_text())["acc"]
    code, out, err = run(monkeypatch, capsys, "import-model", files / "wrn.pth", *WRN, "--out", tmp_path / "imported")
    assert code == 0, err
    sidecar = json.loads((tmp_path / "imported" / "model.json").read_text())
    assert sidecar["metadata"]["imported_from"]["naming"] == "datafree-wrn"
    assert sidecar["metadata"]["imported_from"]["stripped_prefix"] == "module."
    code, _, err = run(monkeypatch, capsys, "evaluate", "--model", tmp_path / "imported", "--dataset", data,
                       "--out", tmp_path / "eval2.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval2.json").read_text())["acc"] == acc


def test_attack_distill_audit_and_scan_take_a_foreign_teacher(files, tmp_path, monkeypatch, capsys):
    data, teacher = f"npz:{files}", files / "wrn.pth"
    code, _, err = run(monkeypatch, capsys, "poison-distill", "--teacher", teacher, *WRN, "--dataset", data,
                       "--method", "fgsm", "--rate", "0.1", "--threshold", "0.01", "--target", "0",
                       "--out", tmp_path / "poisoned", "--no-progress")
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, "distill", "--teacher", teacher, *WRN, "--data", tmp_path / "poisoned",
                       "--test-data", data, "--student-arch", "small-cnn", "--epochs", "1", "--batch-size", "32",
                       "--eval-every", "0", "--out", tmp_path / "student", "--no-progress")
    assert code == 0, err
    record = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert 0 <= record["metrics"]["asr"] <= 1
    code, _, err = run(monkeypatch, capsys, "audit-data", "--teacher", teacher, *WRN, "--data", tmp_path / "poisoned",
                       "--filters", "spectral,activation-clustering", "--out", tmp_path / "audit", "--no-progress")
    assert code == 0, err
    assert set(json.loads((tmp_path / "audit" / "audit.json").read_text())["filters"]) == {
        "spectral", "activation-clustering"}
    code, _, err = run(monkeypatch, capsys, "scan", "--model", teacher, *WRN, "--data", data, "--subset", "9",
                       "--steps", "2", "--out", tmp_path / "scan", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "scan" / "scan.json").is_file()


@pytest.mark.parametrize("extra, message", [
    ([], "give the architecture and class count (--arch, --num-classes) to load bare weights"),
    (["--arch", "wrn-16-1", "--num-classes", "10"], "the file's classifier has 3 classes, not 10"),
    (["--arch", "wrn-16-2", "--num-classes", "3"], "pass arch wrn-16-1"),
    (WRN + ["--mean", "0.5,0.5", "--std", "0.2,0.2,0.2"], r"mean needs 3 values (one per channel)"),
    (WRN + ["--input-size", "4"], "wrn-16-1 cannot take a 4x4 input"),
    (WRN + ["--input-size", "big"], "--input-size: expected N or HxW in px"),
])
def test_bad_model_options_give_one_line_and_leave_nothing(files, tmp_path, monkeypatch, capsys, extra, message):
    code, out, err = run(monkeypatch, capsys, "distill", "--teacher", files / "wrn.pth", *extra,
                         "--data", f"npz:{files}", "--epochs", "1", "--out", tmp_path / "student", "--no-progress")
    assert code != 0
    error = " ".join(err.split())  # rich may wrap a long line
    assert message in error, err
    assert not (tmp_path / "student").exists()


def test_an_experiment_config_loads_a_foreign_teacher(files, tmp_path):
    from kdbackdoor.experiment.config import ExperimentConfig
    from kdbackdoor.experiment.stages import teacher_stage

    config = ExperimentConfig.model_validate({
        "data": {"dataset": f"npz:{files}"},
        "teacher": {"checkpoint": str(files / "wrn.pth"), "arch": "wrn-16-1", "num_classes": 3,
                    "input_size": [48, 48]},
    })
    model, _, info = teacher_stage(config, tmp_path, lambda: pytest.fail("a loaded teacher is not trained"), None,
                                   device=torch.device("cpu"), progress=False)
    assert (model.arch, model.num_classes, model.input_size) == ("wrn-16-1", 3, (48, 48))
    assert info.key != "file:"  # keyed by the file's sha256
