"""Every command, run the way a user runs it (in-process through the entry point)."""

import json
import sys

import pytest
from PIL import Image

from kdbackdoor.cli import main

FAST = ["--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--crop-padding", "0", "--no-hflip",
        "--eval-every", "0", "--no-progress"]


def run(monkeypatch, capsys, *args):
    """Run ``kdbackdoor ARGS``; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["kdbackdoor", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    """A backdoored digits teacher trained through the CLI."""
    out = tmp_path_factory.mktemp("teacher")
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["kdbackdoor", "train-teacher", "--dataset", "digits", "--arch", "small-cnn",
                             "--out", str(out), "--backdoor", "badnets-grid", "--target", "1",
                             "--poison-rate", "0.1", *FAST])
    with pytest.raises(SystemExit) as exit_info:
        main()
    mp.undo()
    assert exit_info.value.code in (0, None)
    return out


def test_train_teacher_writes_checkpoint_metrics_and_provenance(backdoored):
    for name in ("model.safetensors", "model.json", "metrics.json", "provenance.npz", "train_state.pt"):
        assert (backdoored / name).exists(), name
    record = json.loads((backdoored / "metrics.json").read_text())
    assert record["backdoor"]["target"] == 1 and record["backdoor"]["trigger"]["name"] == "badnets-grid"
    assert record["metrics"]["acc"] > 0.5
    assert record["metrics"]["asr"] > record["metrics"]["target_without_trigger"] + 0.3  # the backdoor took


def test_compile_flag_trains_through_torch_compile(monkeypatch, capsys, tmp_path):
    """--compile hands the model to torch.compile for the training steps (a stand-in here: compiling
    takes minutes on CPU; the slow test in test_training.py compiles for real)."""
    import torch
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    code, _, err = run(monkeypatch, capsys, "train-teacher", "--dataset", "digits", "--arch", "small-cnn",
                       "--out", tmp_path / "t", "--compile", *FAST)
    assert code == 0, err
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["config"]["compile"] is True


def test_evaluate_takes_trigger_and_data_from_the_sidecar(backdoored, monkeypatch, capsys, tmp_path):
    code, out, _ = run(monkeypatch, capsys, "evaluate", "--model", backdoored / "model.safetensors",
                       "--out", tmp_path / "eval.json")
    assert code == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["dataset"] == "digits" and len(result["per_class"]) == 10
    assert result["backdoor"]["target"] == 1 and "1" not in result["backdoor"]["per_source_class_asr"]
    assert result["backdoor"]["target_without_trigger"] < 0.2 < result["backdoor"]["asr"]  # the trigger's doing
    assert "ASR" in out and "(target)" in out and "without the trigger" in out


def test_evaluate_with_explicit_trigger(backdoored, monkeypatch, capsys, tmp_path):
    code, _, _ = run(monkeypatch, capsys, "evaluate", "--model", backdoored, "--trigger", "blend",
                     "--target", "3", "--out", tmp_path / "e.json")
    result = json.loads((tmp_path / "e.json").read_text())
    assert code == 0 and result["backdoor"]["trigger"]["name"] == "blend" and result["backdoor"]["target"] == 3


def test_resume_finishes_an_existing_run(backdoored, monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "train-teacher", "--dataset", "digits", "--arch", "small-cnn",
                       "--out", backdoored, "--backdoor", "badnets-grid", "--target", "1", *FAST, "--resume")
    assert code == 0 and "test accuracy" in out


def test_rerun_without_resume_is_refused(backdoored, monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "train-teacher", "--out", backdoored, *FAST)
    assert code == 2 and "--resume" in err


def test_triggers_show_and_list(monkeypatch, capsys, tmp_path):
    code, out, _ = run(monkeypatch, capsys, "triggers", "show", "badnets-square", "sig:frequency=3",
                       "--count", "4", "--out", tmp_path)
    pngs = sorted(tmp_path.glob("*.png"))
    assert code == 0 and len(pngs) == 2
    with Image.open(pngs[0]) as image:
        assert image.width > 4 * 8 and image.height > 3 * 8
    code, out, _ = run(monkeypatch, capsys, "triggers", "list")
    assert code == 0 and "badnets-grid" in out and "wanet" in out


def test_listing_commands(monkeypatch, capsys):
    assert "wrn-16-2" in run(monkeypatch, capsys, "models")[1]
    assert "digits" in run(monkeypatch, capsys, "datasets")[1]


def test_help_rewraps_docstrings_and_lists_each_engine_and_filter_on_its_own_line(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # wide enough that a docstring's own line breaks would show
    code, out, _ = run(monkeypatch, capsys, "run", "--help")
    assert code == 0 and "config key (see docs/experiments.md)" in out  # broken across two source lines
    out = run(monkeypatch, capsys, "poison-distill", "--help")[1]
    assert len([line for line in out.splitlines() if line.strip().startswith(("• fgsm:", "• pgd:", "• cw:",
                                                                               "• generative:"))]) == 4
    out = run(monkeypatch, capsys, "audit-data", "--help")[1]
    assert any(line.strip().startswith("• label-disagreement:") for line in out.splitlines())


@pytest.mark.parametrize("args, message", [
    (["train-teacher", "--dataset", "mnist"], "unknown"),
    (["train-teacher", "--arch", "resnet1000"], "resnet1000"),
    (["train-teacher", "--dataset", "imagefolder:/no/such/folder"], "/no/such/folder"),
    (["train-teacher", "--backdoor", "no-such-trigger"], "no-such-trigger"),
    (["train-teacher", "--backdoor", "badnets-square", "--poison-rate", "1.5"], "--poison-rate"),
    (["train-teacher", "--backdoor", "badnets-square", "--target", "12"], "target 12"),
    (["train-teacher", "--schedule", "sometimes"], "--schedule"),
    (["train-teacher", "--backdoor", "badnets-square:size=40"], "does not fit in 8x8 images"),
    (["evaluate", "--model", "/no/such/model.safetensors"], "/no/such/model.safetensors"),
    (["train-teacher", "--device", "tpu"], "tpu"),
])
def test_bad_input_gives_one_line_and_exit_2(args, message, monkeypatch, capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, _, err = run(monkeypatch, capsys, *args, *(["--out", out_dir] if args[0] == "train-teacher" else []),
                       *(FAST if args[0] == "train-teacher" else []))
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (out_dir / "model.safetensors").exists()


def test_corrupt_checkpoint_is_refused(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = run(monkeypatch, capsys, "evaluate", "--model", bad, "--dataset", "digits")
    assert code == 2 and "model.safetensors" in err


def test_unwritable_output_is_a_clean_error(backdoored, monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # even root cannot create a folder inside a file
    code, _, err = run(monkeypatch, capsys, "evaluate", "--model", backdoored, "--out", blocker / "x" / "e.json")
    assert code == 2 and "a-file" in err and "Traceback" not in err
