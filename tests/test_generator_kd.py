"""Data-free distillation with a generator (zskt, dfad): losses, learning, records, resume."""

import json

import pytest
import torch

from kdbackdoor.distill.generator_kd import GENERATOR_FILE, GeneratorKDConfig, distill_generator
from kdbackdoor.distill.losses import attention_map, attention_transfer_loss
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models import load_checkpoint
from kdbackdoor.models.generator import load_generator

CPU = torch.device("cpu")


def test_attention_map_and_transfer_loss():
    torch.manual_seed(0)
    f = torch.randn(4, 8, 6, 6)
    a = attention_map(f)
    assert a.shape == (4, 36) and torch.allclose(a.norm(dim=1), torch.ones(4))
    assert torch.allclose(attention_map(f * 3), a, atol=1e-6)  # scale-free
    assert float(attention_transfer_loss([f], [f])) == pytest.approx(0.0, abs=1e-6)
    g = torch.randn(4, 16, 12, 12)  # another width and twice the size: pooled to 6x6
    expected = (attention_map(f) - attention_map(torch.nn.functional.adaptive_avg_pool2d(g, 6))).norm(dim=1).mean()
    assert float(attention_transfer_loss([f], [g])) == pytest.approx(float(expected), rel=1e-5)
    # stages pair from the last one: the student's extra first stage is ignored
    assert float(attention_transfer_loss([g, f], [f])) == pytest.approx(0.0, abs=1e-6)


def test_method_defaults_fill_only_what_is_not_given():
    zskt, dfad = GeneratorKDConfig(method="zskt"), GeneratorKDConfig(method="dfad", student_lr=0.05)
    assert (zskt.latent_dim, zskt.student_steps, zskt.attention_beta, zskt.student_optimizer) == (100, 10, 250.0, "adam")
    assert (dfad.latent_dim, dfad.student_steps, dfad.student_lr, dfad.student_optimizer) == (256, 5, 0.05, "sgd")
    with pytest.raises(ValueError):
        GeneratorKDConfig(method="cmi")


@pytest.mark.slow  # about 1 min of CPU
def test_dfad_student_learns_digits_without_data(digits, digits_teacher, tmp_path):
    """No training image is ever shown: the student learns from generated images only."""
    _, test = digits
    config = GeneratorKDConfig(method="dfad", iterations=150, batch_size=64, seed=0)
    student, record = distill_generator(digits_teacher, test, "small-cnn", config, tmp_path, device=CPU,
                                        progress=False)
    assert record["metrics"]["acc"] > 0.2  # chance is 0.1; 35% in our run with a weaker teacher
    assert record["teacher_metrics"]["acc"] > 0.9
    loaded, sidecar = load_checkpoint(tmp_path)  # the run folder loads as the student
    assert sidecar["metadata"]["method"] == "dfad"
    generator = load_generator(tmp_path / GENERATOR_FILE)
    assert generator(torch.randn(2, 256)).shape == (2, 1, 8, 8)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["acc"] == record["metrics"]["acc"]


@pytest.mark.parametrize("method", ["zskt", "dfad"])
def test_interrupted_run_resumes_to_the_same_student(method, digits, digits_teacher, tmp_path, monkeypatch):
    import kdbackdoor.distill.generator_kd as generator_kd
    _, test = digits
    config = GeneratorKDConfig(method=method, iterations=6, batch_size=16, student_steps=2, checkpoint_every=2)
    full, _ = distill_generator(digits_teacher, test, "small-cnn", config, tmp_path / "full", device=CPU,
                                progress=False, evaluate_teacher=False)
    original = generator_kd._Run.iteration
    calls = {"n": 0}

    def crash_at_fifth(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(generator_kd._Run, "iteration", crash_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        distill_generator(digits_teacher, test, "small-cnn", config, tmp_path / "cut", device=CPU,
                          progress=False, evaluate_teacher=False)
    monkeypatch.undo()
    with pytest.raises(KDBackdoorError, match="--resume"):
        distill_generator(digits_teacher, test, "small-cnn", config, tmp_path / "cut", device=CPU, progress=False)
    resumed, _ = distill_generator(digits_teacher, test, "small-cnn", config, tmp_path / "cut", device=CPU,
                                   progress=False, evaluate_teacher=False, resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_data_free_cli_run(monkeypatch, capsys, tmp_path):
    from test_cli import run
    code, _, err = run(monkeypatch, capsys, "train-teacher", "--out", tmp_path / "t", "--epochs", "2",
                       "--no-progress", "--eval-every", "0")
    assert code == 0, err
    code, out, err = run(monkeypatch, capsys, "distill", "--teacher", tmp_path / "t", "--method", "zskt",
                         "--iterations", "3", "--batch-size", "16", "--student-steps", "2", "--out", tmp_path / "s",
                         "--no-progress")
    assert code == 0, err
    record = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert record["method"] == "zskt" and record["config"]["iterations"] == 3
    assert record["dataset"]["spec"] == "digits" and record["test"]["size"] == 359
    code, _, err = run(monkeypatch, capsys, "distill", "--teacher", tmp_path / "t", "--method", "dfad",
                       "--iterations", "0", "--out", tmp_path / "x", "--no-progress")
    assert code == 2 and "--iterations" in err
