"""Data-free distillation (zskt, dfad, deepinversion, cmi): losses, learning, records, resume, hooks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdbackdoor.distill.record import Backdoor
from kdbackdoor.distill.data_free import GENERATOR_FILE, SAMPLES_FILE, DataFreeConfig, distill_data_free
from kdbackdoor.distill.hooks import DistillDefense
from kdbackdoor.distill.losses import attention_map, attention_transfer_loss
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.evaluate import predict
from kdbackdoor.models import build_model, load_checkpoint
from kdbackdoor.models.generator import load_generator
from kdbackdoor.numerics import Numerics, use_numerics
from kdbackdoor.runtime import seed_everything

CPU = torch.device("cpu")


def test_attention_map_and_transfer_loss():
    torch.manual_seed(0)
    f = torch.randn(4, 8, 6, 6)
    a = attention_map(f)
    assert a.shape == (4, 36) and torch.allclose(a.norm(dim=1), torch.ones(4))
    assert torch.allclose(attention_map(f * 3), a, atol=1e-6)  # scale-free
    assert float(attention_transfer_loss([f], [f])) == pytest.approx(0.0, abs=1e-6)
    g = torch.randn(4, 16, 12, 12)  # another width and twice the size: pooled to 6x6
    # ZSKT's term: squared difference of the unit maps, averaged over samples and positions
    expected = (attention_map(f) - attention_map(torch.nn.functional.adaptive_avg_pool2d(g, 6))).pow(2).mean()
    assert float(attention_transfer_loss([f], [g])) == pytest.approx(float(expected), rel=1e-5)
    # stages pair from the last one: the student's extra first stage is ignored
    assert float(attention_transfer_loss([g, f], [f])) == pytest.approx(0.0, abs=1e-6)


def test_zskt_student_loss_weighs_attention_as_zskt_does(digits_teacher):
    """ZSKT's loss is KL/K + β·AT (its KL is averaged over classes too); ours is KL + β·K·AT."""
    from kdbackdoor.distill.data_free import DataFreeRun
    from kdbackdoor.models.features import forward_with_features
    torch.manual_seed(0)
    student = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8))
    images = torch.rand(16, 1, 8, 8)
    run = DataFreeRun(digits_teacher, student, (1, 8, 8), DataFreeConfig(method="zskt"), CPU, DistillDefense())
    with use_numerics(Numerics("fp32")):  # compared with fp32 arithmetic below, to 1e-4
        with_attention = float(run.student_loss(images))
        run.stages = None
        kl = float(run.student_loss(images))
    names = digits_teacher.stage_names
    with torch.no_grad():
        _, t = forward_with_features(digits_teacher, images, names)
        _, s = forward_with_features(student, images, names)
        attention = float(attention_transfer_loss([s[n] for n in names], [t[n] for n in names]))
    assert attention > 0
    assert with_attention - kl == pytest.approx(250.0 * 10 * attention, rel=1e-4)


def test_method_defaults_fill_only_what_is_not_given():
    zskt, dfad = DataFreeConfig(method="zskt"), DataFreeConfig(method="dfad", student_lr=0.05)
    assert (zskt.latent_dim, zskt.student_steps, zskt.attention_beta, zskt.student_optimizer) == (100, 10, 250.0, "adam")
    assert (dfad.latent_dim, dfad.student_steps, dfad.student_lr, dfad.student_optimizer) == (256, 5, 0.05, "sgd")
    assert (zskt.loss, zskt.temperature, dfad.loss, zskt.synthesis_batch_size) == ("kl", 1.0, "l1", 128)
    di = DataFreeConfig(method="deepinversion", adv_weight=1.0)
    assert (di.synthesis_steps, di.bn_weight, di.temperature, di.adv_weight, di.synthesis_batch_size) == (
        2000, 10.0, 20.0, 1.0, 256)
    cmi = DataFreeConfig(method="cmi")
    assert (cmi.synthesis_steps, cmi.bn_weight, cmi.onehot_weight, cmi.adv_weight, cmi.contrastive_weight) == (
        200, 1.0, 0.5, 0.5, 0.8)
    # a pooled method's round takes minutes: its state is saved every round, a generator's every 50
    assert (zskt.checkpoint_every, dfad.checkpoint_every, di.checkpoint_every, cmi.checkpoint_every) == (50, 50, 1, 1)
    assert (zskt.max_grad_norm, dfad.max_grad_norm, cmi.max_grad_norm) == (5.0, 0.0, 0.0)  # ZSKT's code clips
    assert DataFreeConfig(method="cmi", checkpoint_every=5).checkpoint_every == 5
    with pytest.raises(ValueError):
        DataFreeConfig(method="gan")
    with pytest.raises(ValueError):
        DataFreeConfig(method="cmi", bn_weight=-1)


# Settings at which each method's student learns digits in about a minute of CPU (seed 0).
LEARNING = {
    "zskt": dict(iterations=150, batch_size=64),
    "dfad": dict(iterations=150, batch_size=64),
    "deepinversion": dict(iterations=10, synthesis_steps=50, synthesis_batch_size=64, student_steps=20,
                          batch_size=64),
    "cmi": dict(iterations=10, synthesis_steps=30, synthesis_batch_size=64, student_steps=20, batch_size=64),
    "fast": dict(iterations=20, synthesis_batch_size=64, student_steps=20, batch_size=64),
}


@pytest.mark.slow  # about 1 min of CPU per method
@pytest.mark.parametrize("method", list(LEARNING))
def test_student_learns_digits_without_data(method, digits, digits_teacher, tmp_path):
    """No training image is ever shown: the student learns from synthetic images only."""
    _, test = digits
    config = DataFreeConfig(method=method, seed=0, **LEARNING[method])
    student, record = distill_data_free(digits_teacher, test, "small-cnn", config, tmp_path, device=CPU,
                                        progress=False)
    assert record["metrics"]["acc"] > 0.3  # chance is 0.1
    assert record["teacher_metrics"]["acc"] > 0.9
    loaded, sidecar = load_checkpoint(tmp_path)  # the run folder loads as the student
    assert sidecar["metadata"]["method"] == method
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["acc"] == record["metrics"]["acc"]
    assert all(v > 0 for v in record["throughput"].values())


TRANSFER = {
    "zskt": dict(iterations=300, batch_size=64),
    "deepinversion": LEARNING["deepinversion"],
    "fast": LEARNING["fast"],
}


@pytest.mark.slow  # 1-4 min of CPU per method
@pytest.mark.parametrize("method", [
    "zskt",
    "deepinversion",
    "fast",
])
def test_a_poisoned_teachers_backdoor_transfers(method, digits, digits_teacher, backdoored_digits_teacher,
                                                tmp_path):
    """A student distilled without data from a backdoored teacher obeys the trigger; one distilled
    the same way from a clean teacher does not. ASR is compared with how often the student says
    the target on the same clean images, so a student that always says the target cannot pass."""
    _, test = digits
    teacher, trigger, teacher_record = backdoored_digits_teacher
    target = teacher_record["backdoor"]["target"]
    assert teacher_record["metrics"]["asr"] > 0.9
    config = DataFreeConfig(method=method, seed=0, **TRANSFER[method])
    results = {}
    for name, model in (("backdoored", teacher), ("clean", digits_teacher)):
        student, record = distill_data_free(model, test, "small-cnn", config, tmp_path / name, device=CPU,
                                            progress=False, backdoor=Backdoor(trigger, target))
        others = test.subset(test.labels != target)
        says_target = float((predict(student, others) == target).float().mean())
        results[name] = (record["metrics"]["asr"], says_target, record["metrics"]["acc"])
    asr, says_target, acc = results["backdoored"]
    clean_asr = results["clean"][0]
    assert acc > 0.15  # above chance (0.1): the student learnt something besides the trigger
    assert asr > says_target + 0.3, results
    assert asr > clean_asr + 0.3, results


def test_history_tracks_the_backdoor_when_the_teacher_has_one(digits, backdoored_digits_teacher, tmp_path):
    _, test = digits
    teacher, trigger, record = backdoored_digits_teacher
    config = DataFreeConfig(method="dfad", iterations=4, batch_size=16, student_steps=1, eval_every=2)
    _, run = distill_data_free(teacher, test, "small-cnn", config, tmp_path, device=CPU, progress=False,
                               evaluate_teacher=False, backdoor=Backdoor(trigger, record["backdoor"]["target"]))
    assert [row["iteration"] for row in run["history"]] == [2, 4]
    assert all(0 <= row["test_asr"] <= 1 for row in run["history"])
    assert run["history"][-1]["test_asr"] == pytest.approx(run["metrics"]["asr"])  # the same student, measured alike


def test_generator_is_saved_for_generator_methods(digits, digits_teacher, tmp_path):
    _, test = digits
    config = DataFreeConfig(method="dfad", iterations=2, batch_size=16, student_steps=1)
    distill_data_free(digits_teacher, test, "small-cnn", config, tmp_path, device=CPU, progress=False,
                      evaluate_teacher=False)
    generator = load_generator(tmp_path / GENERATOR_FILE)
    assert generator(torch.randn(2, 256)).shape == (2, 1, 8, 8)
    assert generator.output == "batchnorm"  # the default, as ZSKT's and ABD's generators
    assert torch.equal(generator.mean.flatten(), digits_teacher.mean.flatten())  # the teacher's normalisation


TINY = dict(iterations=6, batch_size=16, student_steps=2, checkpoint_every=2, synthesis_batch_size=16)


@pytest.mark.parametrize("method", ["zskt", "dfad", "deepinversion", "cmi", "fast"])
def test_interrupted_run_resumes_to_the_same_student(method, digits, digits_teacher, tmp_path, monkeypatch):
    import kdbackdoor.distill.data_free as data_free
    _, test = digits
    steps = {"zskt": 1, "dfad": 1, "deepinversion": 3, "cmi": 3, "fast": 2}[method]
    config = DataFreeConfig(method=method, synthesis_steps=steps, **TINY)
    full, full_record = distill_data_free(digits_teacher, test, "small-cnn", config, tmp_path / "full", device=CPU,
                                          progress=False, evaluate_teacher=False)
    assert full_record["resumed_from_iteration"] == 0
    original = data_free.DataFreeRun.iteration
    calls = {"n": 0}

    def crash_at_fifth(self, index):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(data_free.DataFreeRun, "iteration", crash_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        distill_data_free(digits_teacher, test, "small-cnn", config, tmp_path / "cut", device=CPU,
                          progress=False, evaluate_teacher=False)
    monkeypatch.undo()
    with pytest.raises(KDBackdoorError, match="--resume"):
        distill_data_free(digits_teacher, test, "small-cnn", config, tmp_path / "cut", device=CPU, progress=False)
    resumed, record = distill_data_free(digits_teacher, test, "small-cnn", config, tmp_path / "cut", device=CPU,
                                        progress=False, evaluate_teacher=False, resume=True)
    assert record["resumed_from_iteration"] == 4  # the crash came in the fifth iteration; checkpoints every 2
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
    assert record["config"]["generator_output"] == "batchnorm"
    assert record["dataset"]["spec"] == "digits" and record["test"]["size"] == 359
    assert record["defense"] == {"name": "none"} and "defense" not in out  # no line for an undefended run
    code, out, err = run(monkeypatch, capsys, "distill", "--teacher", tmp_path / "t", "--method", "cmi",
                         "--iterations", "1", "--synthesis-steps", "2", "--synthesis-batch-size", "8",
                         "--batch-size", "8", "--student-steps", "1", "--save-samples", "--out", tmp_path / "c",
                         "--no-progress")
    assert code == 0, err
    record = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert record["config"]["synthesis_steps"] == 2 and record["config"]["contrastive_weight"] == 0.8
    assert (tmp_path / "c" / "samples.png").is_file()
    code, _, err = run(monkeypatch, capsys, "distill", "--teacher", tmp_path / "t", "--method", "dfad",
                       "--iterations", "0", "--out", tmp_path / "x", "--no-progress")
    assert code == 2 and "--iterations" in err
    code, _, err = run(monkeypatch, capsys, "distill", "--teacher", tmp_path / "t", "--method", "zskt",
                       "--generator-output", "tanh", "--out", tmp_path / "y", "--no-progress")
    assert code == 2 and "--generator-output" in err and "'sigmoid' or 'batchnorm'" in err
    assert not (tmp_path / "y").exists()


class RecordingDefense(DistillDefense):
    """A dummy defense that uses every hook: darkens images, drops every other sample, counts calls."""

    name = "recording"

    def __init__(self, skip_student: bool = False) -> None:
        self.calls = {"setup": 0, "synthesis": 0, "weights": 0, "step": 0}
        self.skip_student = skip_student

    def setup(self, teacher, student, device):
        self.calls["setup"] += 1

    def synthesis_loss(self, images, teacher_logits):
        self.calls["synthesis"] += 1
        assert teacher_logits.shape == (len(images), 10)
        return 100 * images.mean()

    def sample_weights(self, images):
        self.calls["weights"] += 1
        weights = torch.ones(len(images))
        weights[::2] = 0
        return weights

    def student_step(self, step, images, weights):
        self.calls["step"] += 1
        assert float(weights[0]) == 0 and float(weights[1]) == 1
        return 0.0 if self.skip_student else None

    def record(self):
        return {"name": self.name, "calls": dict(self.calls)}


def test_defense_hooks_are_called_and_change_the_run(digits, digits_teacher, tmp_path):
    _, test = digits
    config = DataFreeConfig(method="deepinversion", iterations=2, synthesis_steps=20, synthesis_batch_size=16,
                            student_steps=3, batch_size=16, save_samples=True)
    defense = RecordingDefense()
    _, record = distill_data_free(digits_teacher, test, "small-cnn", config, tmp_path / "defended", device=CPU,
                                  progress=False, evaluate_teacher=False, defense=defense)
    assert defense.calls == {"setup": 1, "synthesis": 40, "weights": 6, "step": 6}
    assert record["defense"] == {"name": "recording", "calls": defense.calls}
    plain = tmp_path / "plain"
    distill_data_free(digits_teacher, test, "small-cnn", config, plain, device=CPU, progress=False,
                      evaluate_teacher=False)
    # the synthesis term darkens what is synthesised (the grey gaps of the grid dilute both means alike)
    dark = np.asarray(Image.open(tmp_path / "defended" / SAMPLES_FILE), dtype=float).mean()
    assert dark < np.asarray(Image.open(plain / SAMPLES_FILE), dtype=float).mean() - 10


def test_zero_weight_samples_do_not_count(digits_teacher):
    config = DataFreeConfig(method="dfad", iterations=1, batch_size=8)
    import kdbackdoor.distill.data_free as data_free
    student = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
    run = data_free.DataFreeRun(digits_teacher, student, (1, 8, 8), config, CPU, DistillDefense())
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([1.0, 0, 1, 0, 1, 0])
    weighted = run.student_loss(images, weights)
    assert float(weighted) == pytest.approx(float(run.student_loss(images[::2])), rel=1e-5)
    assert float(weighted) != pytest.approx(float(run.student_loss(images)), rel=1e-3)


def test_student_steps_clip_the_gradient_norm_when_asked():
    """ZSKT's clipping: with plain SGD (lr 1) the step equals the gradient, whose norm is then at most the bound."""
    from kdbackdoor.distill.hooks import StudentStep
    for bound, expect_clipped in ((0.5, True), (0.0, False)):
        torch.manual_seed(0)
        student = torch.nn.Linear(4, 3)
        before = [p.detach().clone() for p in student.parameters()]
        step = StudentStep(student, student, torch.optim.SGD(student.parameters(), lr=1.0),
                           lambda x, w: 100 * student(x).pow(2).mean(), max_grad_norm=bound)
        step.run(torch.randn(8, 4))
        moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, student.parameters())]).norm()
        if expect_clipped:
            assert float(moved) == pytest.approx(bound, rel=1e-4)
        else:
            assert float(moved) > 10 * 0.5  # the unclipped gradient is far larger


def test_a_defense_can_replace_the_student_step(digits, digits_teacher, tmp_path):
    """A replacement step that does nothing leaves the student's weights at their initial values."""
    _, test = digits
    config = DataFreeConfig(method="zskt", iterations=2, batch_size=8, student_steps=2, seed=3)
    student, _ = distill_data_free(digits_teacher, test, "small-cnn", config, tmp_path, device=CPU, progress=False,
                                   evaluate_teacher=False, defense=RecordingDefense(skip_student=True))
    seed_everything(3)
    initial = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8))
    for (name, a), b in zip(student.named_parameters(), initial.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["deepinversion", "cmi"])
def test_synthesis_runs_on_colour_images_with_a_wide_resnet_teacher(method, tmp_path):
    """Shapes, BatchNorm statistics and the contrastive head at CIFAR size (32x32x3, wrn-16-1)."""
    from kdbackdoor.data.dataset import ImageDataset
    seed_everything(0)
    teacher = build_model("wrn-16-1", num_classes=10, in_channels=3, input_size=(32, 32)).eval()
    test = ImageDataset(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8), torch.arange(20) % 10,
                        classes=[str(i) for i in range(10)], name="random")
    config = DataFreeConfig(method=method, iterations=1, synthesis_steps=2, synthesis_batch_size=8, student_steps=1,
                            batch_size=8, save_samples=True)
    student, record = distill_data_free(teacher, test, "wrn-16-1", config, tmp_path, device=CPU, progress=False)
    assert Image.open(tmp_path / SAMPLES_FILE).size[0] > 8 * 32
    assert record["metrics"]["acc"] == pytest.approx(float((predict(student, test) == test.labels).float().mean()))
