"""Robust distillation: view-averaged teacher targets take the target label away from PGD poisons."""

import json

import pytest
import torch

from kdbackdoor.defenses.robust_kd import RobustKD, RobustKDConfig, RobustTeacher
from kdbackdoor.defenses.views import VIEW_KINDS, ViewConfig, apply_view, gaussian_blur, parse_kinds
from kdbackdoor.distill.dataset_kd import distill
from kdbackdoor.distill.record import Backdoor
from kdbackdoor.distill.losses import KDConfig
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.training import TrainConfig
from test_filters import TARGET, plant_pgd_poisons

# 8x8 digits: noise and JPEG keep them readable, crops and flips do not.
DIGIT_VIEWS = ViewConfig(kinds=["noise", "jpeg"], noise_sigma=24 / 255, jpeg_quality=50)


@pytest.fixture(scope="module")
def pgd_set(digits, digits_teacher):
    data, trigger, _, _ = plant_pgd_poisons(digits_teacher, digits[0])
    return data, trigger


def test_views_keep_shape_range_and_are_seeded():
    x = torch.rand(6, 3, 16, 16)
    for kind in VIEW_KINDS:
        first = apply_view(x, kind, ViewConfig(), torch.Generator().manual_seed(1))
        again = apply_view(x, kind, ViewConfig(), torch.Generator().manual_seed(1))
        assert first.shape == x.shape and first.min() >= 0 and first.max() <= 1, kind
        assert torch.equal(first, again), kind
        assert not torch.equal(first, x), kind
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat)  # a blur keeps constant images
    with pytest.raises(KDBackdoorError, match="unknown view kind.*crop-flip"):
        parse_kinds("noise,sharpen")


def test_robust_teacher_returns_view_averaged_log_probabilities(digits, digits_teacher):
    x = digits[0].pixels(torch.arange(32))
    config = RobustKDConfig(views=DIGIT_VIEWS, num_views=3, seed=5)
    out = RobustTeacher(digits_teacher, config)(x)
    assert torch.allclose(out.exp().sum(1), torch.ones(32), atol=1e-5)
    again = RobustTeacher(digits_teacher, config)(x)
    assert torch.equal(out, again)
    generator = torch.Generator().manual_seed(5)
    expected = torch.stack([
        digits_teacher(apply_view(apply_view(x, "noise", DIGIT_VIEWS, generator), "jpeg", DIGIT_VIEWS, generator))
        .softmax(1) for _ in range(3)]).mean(0)
    assert torch.allclose(out.exp(), expected, atol=1e-5)


def test_robust_targets_take_the_target_away_from_poisons_and_keep_clean_labels(pgd_set, digits_teacher):
    data, _ = pgd_set
    poisons = data.provenance.poisoned
    x = data.pixels()
    with torch.no_grad():
        plain = digits_teacher(x).softmax(1)
    robust = RobustTeacher(digits_teacher, RobustKDConfig(views=DIGIT_VIEWS, num_views=8))(x).exp()
    assert plain[poisons, TARGET].mean() > 0.7  # verified poisons: the plain teacher says target
    assert robust[poisons, TARGET].mean() < plain[poisons, TARGET].mean() - 0.2
    clean_agreement = (robust[~poisons].argmax(1) == plain[~poisons].argmax(1)).float().mean()
    assert clean_agreement > 0.9


def test_distill_with_robust_kd_records_the_defense(pgd_set, digits, digits_teacher, tmp_path):
    data, trigger = pgd_set
    _, test = digits
    config = TrainConfig(epochs=2, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0)
    robust = RobustKDConfig(views=DIGIT_VIEWS, num_views=2)
    _, record = distill(digits_teacher, data, test, "small-cnn", config, KDConfig(kd_lambda=1.0), tmp_path,
                        device=torch.device("cpu"), backdoor=Backdoor(trigger, TARGET), evaluate_teacher=False,
                        progress=False, defense=RobustKD(robust))
    defense = record["defense"]
    assert defense["name"] == "robust-kd" and defense["num_views"] == 2
    assert defense["views"]["kinds"] == ["noise", "jpeg"] and defense["targets"].startswith("cached")
    assert record["teacher_logits_cached"] is True
    assert 0 < defense["seconds_this_run"] < record["wall_seconds_this_run"]  # what the targets cost
    assert json.loads((tmp_path / "metrics.json").read_text())["defense"] == defense
    assert record["history"][-1]["loss"] < record["history"][0]["loss"]  # it trains on the robust targets
