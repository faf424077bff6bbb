"""`audit-data` and `distill --defense`, run the way a user runs them."""

import csv
import json
import re

import numpy as np
import pytest

from kdbackdoor.data.poisoned_set import load_poisoned_set, save_poisoned_set
from kdbackdoor.models import save_checkpoint
from test_cli import run
from test_filters import plant_pgd_poisons

FAST = ["--epochs", "1", "--batch-size", "64", "--lr", "0.05", "--crop-padding", "0", "--no-hflip",
        "--eval-every", "0", "--no-progress"]
LIGHT = ["--filters", "label-disagreement,brittleness", "-p", "brittleness.kinds=noise,jpeg",
         "-p", "brittleness.noise_sigma=16/255", "-p", "brittleness.jpeg_quality=50", "--no-progress"]


@pytest.fixture(scope="module")
def teacher_file(digits_teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_checkpoint(digits_teacher, path, classes=[str(i) for i in range(10)],
                    metadata={"dataset": {"spec": "digits", "data_dir": None, "resize": None}})
    return path


@pytest.fixture(scope="module")
def poisoned_folder(digits, digits_teacher, tmp_path_factory):
    """A poison-distill-style folder: 400 digits + 10% PGD poisons (target 3)."""
    data, trigger, config, report = plant_pgd_poisons(digits_teacher, digits[0])
    folder = tmp_path_factory.mktemp("poisoned") / "set"
    manifest = {"dataset": {"spec": "digits", "data_dir": None, "resize": None, "split": "train"},
                "trigger": trigger.config(), "target": 3, "config": config.model_dump(), **report}
    save_poisoned_set(data, folder, manifest)
    return folder


def test_audit_writes_scores_report_and_a_cleaned_set_that_distill_accepts(
        teacher_file, poisoned_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "audit"
    code, stdout, err = run(monkeypatch, capsys, "audit-data", "--teacher", teacher_file, "--data", poisoned_folder,
                            "--out", out, "--remove", *LIGHT)
    assert code == 0, err
    assert "AUROC" in stdout and "removed" in stdout
    data, _ = load_poisoned_set(poisoned_folder)
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data)
    assert {"label-disagreement_score", "brittleness_flag", "poisoned", "original_label"} <= set(rows[0])
    assert sum(int(r["poisoned"]) for r in rows) == int(data.provenance.poisoned.sum())
    report = json.loads((out / "audit.json").read_text())
    for name in ("label-disagreement", "brittleness"):
        detection = report["filters"][name]["detection"]
        assert detection["auroc"] > 0.7 and detection["tpr_at_5fpr"] > 0.05  # better than chance at 5% FPR
    cleaned, manifest = load_poisoned_set(out / "cleaned")
    removed = report["removal"]["removed"]
    assert removed > 0 and len(cleaned) == len(data) - removed
    assert manifest["filtered"]["removed_by_filter"].keys() == {"label-disagreement", "brittleness"}
    assert len(manifest["filtered"]["removed_rows"]) == removed
    assert manifest["trigger"] == json.loads((poisoned_folder / "manifest.json").read_text())["trigger"]
    assert int(cleaned.provenance.poisoned.sum()) < int(data.provenance.poisoned.sum())
    assert report["removal"]["poisons_left"] == int(cleaned.provenance.poisoned.sum())

    student = tmp_path / "student"
    code, _, err = run(monkeypatch, capsys, "distill", "--teacher", teacher_file, "--data", out / "cleaned",
                       "--out", student, "--kd-lambda", "1", "--no-evaluate-teacher", *FAST)
    assert code == 0, err
    record = json.loads((student / "metrics.json").read_text())
    assert record["train"]["size"] == len(cleaned) and "asr" in record["metrics"]

    code, _, err = run(monkeypatch, capsys, "audit-data", "--teacher", teacher_file, "--data", poisoned_folder,
                       "--out", out, *LIGHT)
    assert code == 2 and "already holds an audit" in err


def test_expected_rate_flags_that_share(teacher_file, poisoned_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "audit"
    code, _, err = run(monkeypatch, capsys, "audit-data", "--teacher", teacher_file, "--data", poisoned_folder,
                       "--out", out, "--filters", "label-disagreement", "--expected-rate", "0.1", "--no-progress")
    assert code == 0, err
    entry = json.loads((out / "audit.json").read_text())["filters"]["label-disagreement"]
    assert entry["flagged"] == 45 and entry["rule"].startswith("top 10.00%")  # ceil(0.1 · 444)


@pytest.mark.parametrize("args,message", [
    (["--filters", "label-disagreement,nope"], "unknown filter 'nope'"),
    (["--filters", "reference-model"], "needs --reference"),
    (["--filters", "strip", "-p", "strip.blends=0"], "strip.*blends"),
    (["--filters", "strip", "-p", "brittleness.draws=2"], "not among --filters"),
])
def test_bad_audit_requests_are_refused(args, message, teacher_file, poisoned_folder, tmp_path, monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "audit-data", "--teacher", teacher_file, "--data", poisoned_folder,
                       "--out", tmp_path / "a", "--no-progress", *args)
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "a" / "audit.json").exists()


def test_audit_refuses_a_data_set_with_other_classes(teacher_file, tmp_path, monkeypatch, capsys):
    path = tmp_path / "four.npz"
    np.savez(path, x=np.zeros((8, 8, 8), np.uint8), y=np.arange(8) % 4, classes=np.array(["a", "b", "c", "d"]))
    code, _, err = run(monkeypatch, capsys, "audit-data", "--teacher", teacher_file, "--data", f"npz:{path}",
                       "--out", tmp_path / "a", "--filters", "label-disagreement", "--no-progress")
    assert code == 2 and "10 classes" in err and "4" in err


def test_distill_defense_is_validated_and_recorded(teacher_file, poisoned_folder, tmp_path, monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "distill", "--teacher", teacher_file, "--out", tmp_path / "x",
                       "--defense", "magic", *FAST)
    assert code == 2 and "unknown --defense 'magic'" in err
    code, _, err = run(monkeypatch, capsys, "distill", "--teacher", teacher_file, "--out", tmp_path / "y",
                       "--method", "zskt", "--defense", "robust-kd", *FAST)
    assert code == 2 and "works with --method dataset | ood" in err
    code, _, err = run(monkeypatch, capsys, "distill", "--teacher", teacher_file, "--out", tmp_path / "z",
                       "--defense", "robust-kd", "--views", "noise,warp", *FAST)
    assert code == 2 and "unknown view kind" in err
    out = tmp_path / "robust"
    code, _, err = run(monkeypatch, capsys, "distill", "--teacher", teacher_file, "--data", poisoned_folder,
                       "--out", out, "--defense", "robust-kd", "--views", "noise,jpeg", "--num-views", "2",
                       "--noise-sigma", "16/255", "--kd-lambda", "1", "--no-baseline", "--no-evaluate-teacher", *FAST)
    assert code == 0, err
    defense = json.loads((out / "metrics.json").read_text())["defense"]
    assert defense["name"] == "robust-kd" and defense["num_views"] == 2
    assert defense["views"]["kinds"] == ["noise", "jpeg"] and defense["views"]["noise_sigma"] == 16 / 255
