"""Distillation: the KD loss, its λ extremes, cached teacher logits, and distilled students."""

import json

import pytest
import torch
import torch.nn.functional as F

from kdbackdoor.distill.dataset_kd import distill
from kdbackdoor.distill.record import Backdoor
from kdbackdoor.distill.losses import KDConfig, kd_divergence, kd_loss, precompute_logits
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.evaluate import predict
from kdbackdoor.models import build_model, load_checkpoint
from kdbackdoor.training import TrainConfig
from kdbackdoor.triggers import build_trigger

FAST = dict(batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0)


class Exploding(torch.nn.Module):
    """A teacher that must never be run."""

    def forward(self, x):
        raise AssertionError("the teacher was run")


def test_kd_divergence_matches_its_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    t = 3.0
    p = F.softmax(teacher / t, 1)
    expected = (p * (p.log() - F.log_softmax(student / t, 1))).sum(1).mean() * t ** 2
    assert kd_divergence(student, teacher, t) == pytest.approx(float(expected), rel=1e-5)
    assert float(kd_divergence(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_divergence(student, teacher, t)) > 0


def test_kd_loss_mixes_ce_and_kl_by_lambda():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, y, idx = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.arange(8)
    ce = F.cross_entropy(student(x), y)
    kl = kd_divergence(student(x), teacher(x), 2.0)
    for lam in (0.0, 0.25, 1.0):
        loss, logits = kd_loss(teacher, KDConfig(kd_lambda=lam, temperature=2.0))(student, x, y, idx)
        assert float(loss.detach()) == pytest.approx(float((1 - lam) * ce.detach() + lam * kl.detach()), rel=1e-5)
        assert torch.equal(logits, student(x))


def test_kd_loss_pushes_the_student_away_on_marked_rows():
    """ABD's OOD vaccine: mean KD over unmarked rows − weight · mean KD over marked ones (capped at
    a uniform prediction's), rows found by the batch's dataset indices."""
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.zeros(6, dtype=torch.long)
    idx = torch.tensor([5, 0, 3, 1, 4, 2])  # the batch's rows of a 6-row data set
    marked = torch.tensor([False, False, True, False, False, True])  # rows 2 and 5: batch positions 5 and 0
    each = kd_divergence(student(x), teacher(x), 4.0, per_sample=True)
    assert float(each.mean()) == pytest.approx(float(kd_divergence(student(x), teacher(x), 4.0)), rel=1e-5)
    loss, _ = kd_loss(teacher, KDConfig(kd_lambda=1.0), push_away=marked, push_weight=0.1)(student, x, y, idx)
    uniform = kd_divergence(torch.zeros(6, 3), teacher(x), 4.0, per_sample=True)  # a know-nothing student
    away = torch.minimum(each, uniform)[[0, 5]].mean()
    expected = each[[1, 2, 3, 4]].mean() - 0.1 * away
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # the push is bounded: a student far from the teacher on a marked row gains nothing more there
    far = torch.nn.Linear(4, 3)
    with torch.no_grad():
        far.weight.copy_(-50 * teacher.weight)
        far.bias.copy_(-50 * teacher.bias)
    only_marked = torch.ones(6, dtype=torch.bool)
    pushed, _ = kd_loss(teacher, KDConfig(kd_lambda=1.0), push_away=only_marked)(far, x, y, idx)
    assert float(pushed.detach()) == pytest.approx(float(-0.1 * uniform.mean().detach()), rel=1e-5)
    nothing_marked, _ = kd_loss(teacher, KDConfig(kd_lambda=1.0), push_away=torch.zeros(6, dtype=torch.bool))(
        student, x, y, idx)
    assert float(nothing_marked.detach()) == pytest.approx(float(each.mean().detach()), rel=1e-5)


def test_lambda_zero_never_runs_the_teacher_and_lambda_one_ignores_labels():
    student = torch.nn.Linear(4, 3)
    x, idx = torch.randn(8, 4), torch.arange(8)
    kd_loss(Exploding(), KDConfig(kd_lambda=0.0))(student, x, torch.zeros(8, dtype=torch.long), idx)
    teacher = torch.nn.Linear(4, 3)
    loss_fn = kd_loss(teacher, KDConfig(kd_lambda=1.0))
    a, _ = loss_fn(student, x, torch.zeros(8, dtype=torch.long), idx)
    b, _ = loss_fn(student, x, torch.full((8,), 2), idx)
    assert float(a) == float(b)


def test_cached_teacher_logits_give_the_same_loss(digits):
    train, _ = digits
    teacher = build_model("small-cnn", 10, in_channels=1, input_size=(8, 8)).eval()
    student = build_model("small-cnn", 10, in_channels=1, input_size=(8, 8))
    cached = precompute_logits(teacher, train.images)
    assert cached.shape == (len(train), 10)
    x, y, idx = next(train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    config = KDConfig(kd_lambda=0.7)
    live, _ = kd_loss(teacher, config)(student, x, y, idx)
    stored, _ = kd_loss(Exploding(), config, cached)(student, x, y, idx)
    assert float(live) == pytest.approx(float(stored), rel=1e-5)


def test_kd_config_rejects_bad_values():
    for bad in ({"kd_lambda": -0.1}, {"kd_lambda": 1.1}, {"temperature": 0}):
        with pytest.raises(ValueError):
            KDConfig(**bad)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_distilled_student_learns_the_task_at_both_extremes(lam, digits, digits_teacher, tmp_path):
    train, test = digits
    student, record = distill(digits_teacher, train, test, "small-cnn", TrainConfig(epochs=6, **FAST),
                              KDConfig(kd_lambda=lam), tmp_path, device=torch.device("cpu"), progress=False)
    assert record["metrics"]["acc"] > 0.8  # chance is 0.1
    assert record["teacher_logits_cached"] is (lam > 0)
    assert record["teacher_metrics"]["acc"] > 0.9
    loaded, sidecar = load_checkpoint(tmp_path)
    assert sidecar["metadata"]["kd"]["kd_lambda"] == lam
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["acc"] == record["metrics"]["acc"]


def test_kl_only_student_learns_from_the_teacher_even_with_garbage_labels(digits, digits_teacher, tmp_path):
    """With λ = 1 the labels are unused: a student on shuffled labels still learns the task."""
    train, test = digits
    shuffled = train.subset(torch.arange(len(train)))
    shuffled.labels = shuffled.labels[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
    _, record = distill(digits_teacher, shuffled, test, "small-cnn", TrainConfig(epochs=6, **FAST),
                        KDConfig(kd_lambda=1.0), tmp_path, device=torch.device("cpu"), progress=False,
                        evaluate_teacher=False)
    assert record["metrics"]["acc"] > 0.8
    assert record["history"][-1]["train_acc"] < 0.3  # measured against the shuffled labels


def test_distillation_resumes_to_the_same_student(digits, digits_teacher, tmp_path, monkeypatch):
    import kdbackdoor.distill.dataset_kd as dataset_kd
    train, test = digits
    config, kd = TrainConfig(epochs=3, **FAST), KDConfig(kd_lambda=0.5)
    full, _ = distill(digits_teacher, train, test, "small-cnn", config, kd, tmp_path / "full",
                      device=torch.device("cpu"), progress=False, evaluate_teacher=False)

    original_fit = dataset_kd.fit

    def interrupted_fit(*args, **kwargs):
        def stop(epoch, row):
            if epoch == 1:
                raise KeyboardInterrupt
        return original_fit(*args, **kwargs, on_epoch_end=stop)

    monkeypatch.setattr(dataset_kd, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        distill(digits_teacher, train, test, "small-cnn", config, kd, tmp_path / "cut",
                device=torch.device("cpu"), progress=False, evaluate_teacher=False)
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    resumed, _ = distill(digits_teacher, train, test, "small-cnn", config, kd, tmp_path / "cut",
                         device=torch.device("cpu"), progress=False, evaluate_teacher=False, resume=True)
    for pa, pb in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(pa, pb)


def test_mismatched_data_is_refused(digits, digits_teacher, tmp_path):
    train, test = digits
    three_classes = train.subset(train.labels < 3)
    three_classes.classes = three_classes.classes[:3]
    with pytest.raises(KDBackdoorError, match="classes"):
        distill(digits_teacher, three_classes, test, "small-cnn", TrainConfig(epochs=1, **FAST), KDConfig(),
                tmp_path, device=torch.device("cpu"), progress=False)
    with pytest.raises(KDBackdoorError, match="baseline needs a poisoned"):
        distill(digits_teacher, train, test, "small-cnn", TrainConfig(epochs=1, **FAST), KDConfig(),
                tmp_path / "b", device=torch.device("cpu"), progress=False, baseline=True)


def test_backdoor_metrics_and_trigger_sensitivity_are_recorded(digits, digits_teacher, tmp_path):
    train, test = digits
    trigger = build_trigger("badnets-square:size=8", image_shape=train.image_shape)
    student, record = distill(digits_teacher, train, test, "small-cnn", TrainConfig(epochs=1, **FAST), KDConfig(),
                              tmp_path, device=torch.device("cpu"), progress=False,
                              backdoor=Backdoor(trigger, 0, [3, 5]))
    metrics = record["metrics"]
    assert set(metrics["per_source_class_asr"]) == set(test.classes[1:])
    sensitivity = metrics["trigger_sensitivity"]
    assert sensitivity["source_classes"] == [test.classes[3], test.classes[5]]
    per_class, counts = metrics["per_source_class_asr"], torch.bincount(test.labels)
    expected = (per_class[test.classes[3]] * counts[3] + per_class[test.classes[5]] * counts[5]) / (counts[3] + counts[5])
    assert sensitivity["asr_on_sources"] == pytest.approx(float(expected))
    assert record["backdoor"]["source_classes"] == [3, 5]
    assert record["history"][-1]["test_asr"] == metrics["asr"]  # the per-epoch history follows the backdoor too
    others = test.subset(test.labels != 0)
    assert metrics["target_without_trigger"] == pytest.approx(float((predict(student, others) == 0).float().mean()))
