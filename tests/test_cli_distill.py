"""`poison-distill`, `distill` and `evaluate` on their records, run the way a user runs them."""

import json
import re

import pytest

from test_cli import run

TRAIN = ["--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--crop-padding", "0", "--no-hflip",
         "--eval-every", "0", "--no-progress"]
ATTACK = ["--trigger", "badnets-square:size=8", "--eps", "48/255", "--step-size", "8/255", "--no-progress"]


@pytest.fixture(scope="module")
def clean_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean-teacher")
    mp = pytest.MonkeyPatch()
    try:
        code, _, err = run(mp, _Capture(), "train-teacher", "--out", out, *TRAIN)
    finally:
        mp.undo()
    assert code == 0, err
    return out


class _Capture:
    """A stand-in for capsys in module fixtures (output is not inspected there)."""

    def readouterr(self):
        return "", ""


@pytest.fixture(scope="module")
def poisoned_set(clean_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("poisoned") / "set"
    mp = pytest.MonkeyPatch()
    try:
        code, _, _ = run(mp, _Capture(), "poison-distill", "--teacher", clean_teacher, "--out", out,
                         "--target", "1", "--rate", "0.05", "--source-classes", "2,3", *ATTACK)
    finally:
        mp.undo()
    assert code == 0
    return out


def test_poison_distill_writes_set_manifest_and_preview(poisoned_set):
    manifest = json.loads((poisoned_set / "manifest.json").read_text())
    assert (poisoned_set / "poisoned.npz").is_file() and (poisoned_set / "poisons.png").is_file()
    assert manifest["format"] == "kdbackdoor-poisoned-set/1"
    assert manifest["target"] == 1 and manifest["config"]["source_classes"] == [2, 3]
    assert manifest["engine"] == {"name": "pgd", "eps": 48 / 255, "step_size": 8 / 255, "steps": 20,
                                  "norm": "linf", "random_start": True}
    assert manifest["trigger"]["name"] == "badnets-square"
    assert len(manifest["teacher"]["weights_sha256"]) == 64
    counts = manifest["counts"]
    assert counts["kept"] == manifest["poisoned"] > 0 and counts["tried"] >= counts["kept"]
    assert manifest["teacher_stability"]["poison_with_trigger"]["min"] >= 0.5
    assert "appended" in manifest["rate_meaning"]


def test_poison_distill_refuses_to_overwrite(clean_teacher, poisoned_set, monkeypatch, capsys):
    before = (poisoned_set / "poisoned.npz").read_bytes()
    code, _, err = run(monkeypatch, capsys, "poison-distill", "--teacher", clean_teacher, "--out", poisoned_set,
                       *ATTACK)
    assert code == 2 and "already holds a poisoned set" in err
    assert (poisoned_set / "poisoned.npz").read_bytes() == before


def test_distill_on_a_poisoned_set_records_student_baseline_teacher_and_poisons(
        clean_teacher, poisoned_set, monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, "distill", "--teacher", clean_teacher, "--data", poisoned_set,
                         "--out", tmp_path / "s", "--kd-lambda", "1", *TRAIN)
    assert code == 0, err
    assert "baseline student" in out and "teacher P(target)" in out
    record = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert record["backdoor"]["target"] == 1 and record["backdoor"]["source_classes"] == [2, 3]
    assert "false_positive_rate" in record["metrics"]["trigger_sensitivity"]
    manifest = json.loads((poisoned_set / "manifest.json").read_text())
    assert record["baseline"]["train"]["size"] == record["train"]["size"] - manifest["poisoned"]
    assert record["baseline"]["train"]["poisoned"] == 0
    assert record["poisoned_set"]["counts"] == manifest["counts"]
    assert (tmp_path / "s" / "baseline" / "model.safetensors").is_file()
    # evaluate reads the trigger, target and data set from the student's record and shows the rest
    code, out, err = run(monkeypatch, capsys, "evaluate", "--model", tmp_path / "s")
    assert code == 0, err
    assert "ASR" in out and "baseline student" in out and "teacher P(target)" in out
    evaluation = json.loads((tmp_path / "s" / "evaluation.json").read_text())
    assert evaluation["backdoor"]["asr"] == pytest.approx(record["metrics"]["asr"])
    assert evaluation["acc"] == pytest.approx(record["metrics"]["acc"])


def test_distill_on_a_plain_data_set(clean_teacher, monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, "distill", "--teacher", clean_teacher, "--data", "digits",
                         "--out", tmp_path / "s", "--kd-lambda", "0", *TRAIN)
    assert code == 0, err
    record = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert record["kd"]["kd_lambda"] == 0 and record["backdoor"] is None and "baseline" not in record


@pytest.mark.parametrize("args, message", [
    (["poison-distill", "--target", "10"], "target 10 out of range"),
    (["poison-distill", "--rate", "0"], "--rate"),
    (["poison-distill", "--rate", "1.2"], "--rate"),
    (["poison-distill", "--trigger", "badnets-square:size=40"], "does not fit"),
    (["poison-distill", "--method", "deepfool"], "unknown engine"),
    (["poison-distill", "--method", "fgsm", "--steps", "3"], "single step"),
    (["poison-distill", "--eps", "eight"], "--eps"),
    (["poison-distill", "--param", "c"], "KEY=VALUE"),
    (["poison-distill", "--method", "cw", "--eps", "8/255"], "eps"),
    (["poison-distill", "--method", "generative"], "needs a generator"),
    (["poison-distill", "--method", "cw", "--early-exit"], "early exit is not supported by the cw engine"),
    (["poison-distill", "--source-classes", "a,b"], "--source-classes"),
    (["poison-distill", "--label-mode", "random"], "--label-mode"),
    (["poison-distill", "--dataset", "npz:RGB"], "channels"),
    (["distill", "--kd-lambda", "1.5"], "--kd-lambda"),
    (["distill", "--temperature", "0"], "--temperature"),
    (["distill", "--data", "npz:RGB"], "channels"),
    (["distill", "--baseline"], "needs a poisoned set"),
    (["distill", "--target", "3"], "--target given without --trigger"),
])
def test_bad_input_gives_one_line_and_exit_2(args, message, clean_teacher, monkeypatch, capsys, tmp_path):
    rgb = tmp_path / "rgb.npz"
    import numpy as np
    np.savez(rgb, x=np.zeros((20, 8, 8, 3), np.uint8), y=np.arange(20) % 10)
    args = [str(rgb).join(a.split("RGB")) if "RGB" in a else a for a in args]
    out_dir = tmp_path / "out"
    extra = TRAIN if args[0] == "distill" else ["--no-progress"]
    code, _, err = run(monkeypatch, capsys, *args, "--teacher", clean_teacher, "--out", out_dir, *extra)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())



@pytest.fixture(scope="module")
def backdoored_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("backdoored-teacher")
    mp = pytest.MonkeyPatch()
    try:
        code, _, _ = run(mp, _Capture(), "train-teacher", "--out", out, "--backdoor", "badnets-grid", "--target", "1",
                         "--poison-rate", "0.1", "--epochs", "8", *TRAIN[2:])
    finally:
        mp.undo()
    assert code == 0
    return out


@pytest.fixture(scope="module")
def ood_set(tmp_path_factory):
    """Out-of-distribution images for the digits teacher: upside-down digits with 3 made-up classes."""
    import numpy as np
    from kdbackdoor.data.sources import load_dataset
    train = load_dataset("digits", "train")
    x = train.images.flip(2).permute(0, 2, 3, 1).numpy()
    folder = tmp_path_factory.mktemp("ood")
    np.savez(folder / "train.npz", x=x, y=np.arange(len(x)) % 3)
    return folder / "train.npz"


def test_clean_data_kd_reports_the_teachers_backdoor(backdoored_teacher, monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, "distill", "--teacher", backdoored_teacher, "--data", "digits",
                         "--out", tmp_path / "s", "--kd-lambda", "1", *TRAIN)
    assert code == 0, err
    record = json.loads((tmp_path / "s" / "metrics.json").read_text())
    teacher = json.loads((backdoored_teacher / "model.json").read_text())["metadata"]["backdoor"]
    assert record["backdoor"]["trigger"] == teacher["trigger"] and record["backdoor"]["target"] == 1
    assert record["teacher_metrics"]["asr"] > 0.9  # the teacher's backdoor, measured again


def test_ood_distillation_uses_any_images_and_the_teachers_test_set(backdoored_teacher, ood_set, monkeypatch,
                                                                    capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, "distill", "--teacher", backdoored_teacher, "--method", "ood",
                         "--data", f"npz:{ood_set}", "--cutmix", "0.5", "--out", tmp_path / "s", "--epochs", "8",
                         *TRAIN[2:])
    assert code == 0, err
    record = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert record["kd"]["kd_lambda"] == 1.0 and record["config"]["cutmix"] == 0.5
    assert record["method"] == "ood" and record["dataset"]["spec"] == "digits"
    assert record["test"]["size"] == 359 and record["train"]["size"] == 1438
    assert record["backdoor"]["target"] == 1 and "asr" in record["metrics"]
    assert record["metrics"]["acc"] > 0.3  # learned digits from upside-down ones (chance 0.1)


def test_ood_distillation_takes_abd(backdoored_teacher, ood_set, monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, "distill", "--teacher", backdoored_teacher, "--method", "ood",
                         "--data", f"npz:{ood_set}", "--out", tmp_path / "s", "--epochs", "1", "--defense", "abd",
                         "--no-sv-tail-test", "--sr-rounds", "1", "--sr-start", "0.9", *TRAIN[2:])
    assert code == 0, err
    record = json.loads((tmp_path / "s" / "metrics.json").read_text())
    sv, sr = record["defense"]["parts"]
    assert record["defense"]["name"] == "abd" and sv["enabled"] is True
    assert sv["pushed"] == sv["suspicious"] and sv["config"]["transfer_action"] == "push"
    assert sr["config"]["rounds"] == 1 and sr["steps"] >= 1
    assert re.search(rf"defense abd: sv on, [\d.]+ s; sr, {sr['steps']} steps, [\d.]+ s \(run: [\d.]+ s", out)


@pytest.mark.parametrize("args, message", [
    (["--method", "ood", "--kd-lambda", "0.5"], "needs --kd-lambda 1"),
    (["--kd-lambda", "0.5", "--cutmix", "0.5"], "CutMix"),
    (["--method", "oracle"], "unknown --method"),
    (["--cutmix", "2"], "--cutmix"),
    (["--method", "ood", "--defense", "abd", "--sv-transfer-action", "bury"], "--sv-transfer-action"),
    (["--method", "ood", "--defense", "sr", "--sr-portion", "0"], "--sr-portion"),
])
def test_bad_distillation_methods_are_refused(args, message, backdoored_teacher, ood_set, monkeypatch, capsys,
                                              tmp_path):
    code, _, err = run(monkeypatch, capsys, "distill", "--teacher", backdoored_teacher, "--data", f"npz:{ood_set}",
                       *args, "--out", tmp_path / "s", *TRAIN)
    assert code == 2 and message in err and "Traceback" not in err
    assert not any((tmp_path / "s").glob("*"))  # refused before anything was written
