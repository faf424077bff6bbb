"""Every command at 64 px and at 224 px on tiny data: triggers, the three crafting engines,
dataset/OOD/data-free distillation (ZSKT, DFAD, DeepInversion, CMI), the six set filters, the
scan and the report. 64 px runs by default; 224 px is slow-marked (minutes on a CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_cli import run

FILTERS = "activation-clustering,brittleness,label-disagreement,reference-model,spectral,strip"
DATA_FREE = ["--iterations", "1", "--synthesis-steps", "1", "--synthesis-batch-size", "4", "--batch-size", "4",
             "--student-steps", "1", "--pool-size", "8", "--eval-every", "0"]
FAST = ["--epochs", "1", "--batch-size", "8", "--eval-every", "0", "--no-progress"]


def tiny_npz(folder, side: int) -> str:
    """Three classes told apart by their brightness, 12 training and 6 test images of ``side`` px."""
    generator = np.random.default_rng(side)
    for split, count in (("train", 12), ("test", 6)):
        labels = np.arange(count) % 3
        images = generator.integers(0, 100, (count, side, side, 3), dtype=np.uint8) + (labels * 70).astype(
            np.uint8)[:, None, None, None]
        np.savez(folder / f"{split}.npz", x=images, y=labels, classes=np.array(["dark", "grey", "bright"]))
    return f"npz:{folder}"


def ok(monkeypatch, capsys, *args) -> str:
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 0, f"kdbackdoor {' '.join(map(str, args))}\n{err}"
    return out


def every_command(side: int, tmp_path, monkeypatch, capsys) -> None:
    data = tiny_npz(tmp_path, side)
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    ok(monkeypatch, capsys, "train-teacher", "--dataset", data, "--arch", "small-cnn", "--backdoor", "badnets-grid",
       "--target", "0", "--poison-rate", "0.25", "--crop-padding", str(side // 8), "--out", teacher, *FAST)
    assert json.loads((teacher / "model.json").read_text())["input_size"] == [side, side]
    ok(monkeypatch, capsys, "evaluate", "--model", teacher, "--trigger", "blend", "--target", "0")
    for method, steps in (("fgsm", []), ("pgd", ["--steps", "2"]), ("cw", ["--steps", "2"])):
        ok(monkeypatch, capsys, "poison-distill", "--teacher", teacher, "--dataset", data, "--method", method, *steps,
           "--trigger", "badnets-square", "--target", "1", "--rate", "0.2", "--threshold", "0.01",
           "--out", tmp_path / f"poisoned-{method}", "--no-progress")
    poisoned = tmp_path / "poisoned-pgd"
    ok(monkeypatch, capsys, "distill", "--teacher", teacher, "--data", poisoned, "--test-data", data,
       "--student-arch", "small-cnn", "--out", student, *FAST)
    record = json.loads((student / "metrics.json").read_text())
    assert record["backdoor"]["trigger"]["name"] == "badnets-square"
    ok(monkeypatch, capsys, "distill", "--teacher", teacher, "--method", "ood", "--data", data, "--test-data", data,
       "--student-arch", "small-cnn", "--out", tmp_path / "ood", *FAST)
    for method in ("zskt", "dfad", "deepinversion", "cmi"):
        ok(monkeypatch, capsys, "distill", "--teacher", teacher, "--method", method, "--test-data", data,
           "--student-arch", "small-cnn", "--out", tmp_path / method, *DATA_FREE, "--no-progress")
        assert json.loads((tmp_path / method / "metrics.json").read_text())["metrics"]["acc"] >= 0
    ok(monkeypatch, capsys, "audit-data", "--teacher", teacher, "--data", poisoned, "--filters", FILTERS,
       "--reference", student, "--out", tmp_path / "audit", "--no-progress")
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert set(audit["filters"]) == set(FILTERS.split(","))
    ok(monkeypatch, capsys, "scan", "--model", student, "--data", data, "--subset", "6", "--steps", "2",
       "--trigger", "badnets-square", "--out", tmp_path / "scan", "--no-progress")
    assert len(json.loads((tmp_path / "scan" / "scan.json").read_text())["neural_cleanse"]["per_class"]) == 3
    config = tmp_path / "run.yaml"  # reports read experiment runs: one, on the teacher above
    config.write_text(f"""name: res{side}
data: {{dataset: "{data}"}}
teacher: {{checkpoint: "{teacher / 'model.safetensors'}"}}
distill:
  method: zskt
  student_arch: small-cnn
  data_free: {{iterations: 1, synthesis_steps: 1, synthesis_batch_size: 4, batch_size: 4, student_steps: 1,
              pool_size: 8, eval_every: 0}}
""")
    ok(monkeypatch, capsys, "run", config, "--results", tmp_path / "results", "--no-progress")
    ok(monkeypatch, capsys, "report", tmp_path / "results", "--out", tmp_path / "report.html")
    assert "res" in (tmp_path / "report.html").read_text()


def test_every_command_at_64_px(tmp_path, monkeypatch, capsys):
    every_command(64, tmp_path, monkeypatch, capsys)


@pytest.mark.slow
def test_every_command_at_224_px(tmp_path, monkeypatch, capsys):
    every_command(224, tmp_path, monkeypatch, capsys)
