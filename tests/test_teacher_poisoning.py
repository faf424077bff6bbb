import numpy as np
import pytest
import torch

from kdbackdoor.attacks.teacher_poisoning import PoisonConfig, holdout_split, poison_training_set
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.evaluate import attack_success_rate
from kdbackdoor.models import build_model, load_checkpoint
from kdbackdoor.teacher import MODEL_FILE, PROVENANCE_FILE, train_teacher
from kdbackdoor.training import TrainConfig
from kdbackdoor.triggers import build_trigger


@pytest.fixture(scope="module")
def grid(digits):
    return build_trigger("badnets-grid", image_shape=digits[0].image_shape)


def test_replace_mode_swaps_non_target_images_for_triggered_copies(digits, grid):
    train, _ = digits
    out = poison_training_set(train, grid, PoisonConfig(target=0, rate=0.1, seed=1))
    prov = out.provenance
    assert len(out) == len(train)
    assert int(prov.poisoned.sum()) == round(0.1 * len(train))
    rows = prov.poisoned.nonzero().squeeze(1)
    assert bool((out.labels[rows] == 0).all())
    assert bool((prov.original_label[rows] != 0).all())
    assert torch.equal(prov.original_label, train.labels)
    clean_rows = (~prov.poisoned).nonzero().squeeze(1)
    assert torch.equal(out.images[clean_rows], train.images[clean_rows])
    expected = (grid(train.pixels(rows)) * 255).round().to(torch.uint8)
    assert torch.equal(out.images[rows], expected)
    outside = ~grid.changed_mask()
    assert torch.equal(out.images[rows][:, :, outside], train.images[rows][:, :, outside])


def test_draw_is_seeded(digits, grid):
    train, _ = digits
    a = poison_training_set(train, grid, PoisonConfig(rate=0.05, seed=3)).provenance.poisoned
    b = poison_training_set(train, grid, PoisonConfig(rate=0.05, seed=3)).provenance.poisoned
    c = poison_training_set(train, grid, PoisonConfig(rate=0.05, seed=4)).provenance.poisoned
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_add_mode_appends_so_poisons_are_the_rate_of_the_final_set(digits, grid):
    train, _ = digits
    out = poison_training_set(train, grid, PoisonConfig(target=3, rate=0.2, mode="add"))
    added = len(out) - len(train)
    assert added == round(0.2 * len(train) / 0.8)
    assert out.provenance.poisoned.float().mean() == pytest.approx(0.2, abs=0.002)
    assert torch.equal(out.images[:len(train)], train.images)
    assert bool(out.provenance.poisoned[len(train):].all())
    assert bool((out.labels[len(train):] == 3).all())


def test_clean_label_style_poisons_only_target_images_and_keeps_labels(digits):
    train, _ = digits
    sig = build_trigger("sig", image_shape=train.image_shape)
    config = PoisonConfig(target=2, rate=0.05)
    assert config.resolved_style(sig) == "clean"
    out = poison_training_set(train, sig, config)
    rows = out.provenance.poisoned.nonzero().squeeze(1)
    assert len(rows) == round(0.05 * len(train))
    assert bool((train.labels[rows] == 2).all()) and torch.equal(out.labels, train.labels)
    with pytest.raises(KDBackdoorError, match="largest possible rate"):
        poison_training_set(train, sig, PoisonConfig(target=2, rate=0.5))


def test_clean_label_trigger_needs_an_adversary_and_perturbs_within_eps(digits):
    train, _ = digits
    trig = build_trigger("clean-label", image_shape=train.image_shape)
    with pytest.raises(KDBackdoorError, match="--adv-model"):
        poison_training_set(train, trig, PoisonConfig(target=1, rate=0.02))
    torch.manual_seed(0)
    adversary = build_model("small-cnn", 10, 1, (8, 8)).eval()
    out = poison_training_set(train, trig, PoisonConfig(target=1, rate=0.02, adv_eps=16 / 255, adv_steps=3),
                              adversary=adversary)
    rows = out.provenance.poisoned.nonzero().squeeze(1)
    outside = ~trig.changed_mask()
    diff = (out.images[rows].int() - train.images[rows].int())[:, :, outside].abs()
    assert 0 < int(diff.max()) <= 16
    assert torch.equal(out.labels, train.labels)


def test_bad_poison_settings_are_rejected(digits, grid):
    train, _ = digits
    with pytest.raises(KDBackdoorError, match="target 10 out of range"):
        poison_training_set(train, grid, PoisonConfig(target=10))
    with pytest.raises(ValueError):
        PoisonConfig(rate=1.0)
    with pytest.raises(ValueError):
        PoisonConfig(rate=0)
    with pytest.raises(KDBackdoorError, match="no poisoned image"):
        poison_training_set(train, grid, PoisonConfig(rate=0.0001))


def test_holdout_is_seeded_disjoint_and_recorded(digits):
    train, _ = digits
    rest, held = holdout_split(train, 0.1, seed=0)
    assert len(held) == round(0.1 * len(train)) and len(rest) + len(held) == len(train)
    assert not set(held.tolist()) & set(rest.provenance.source_index.tolist())
    assert torch.equal(holdout_split(train, 0.1, seed=0)[1], held)


def test_backdoored_teacher_learns_the_trigger_and_records_it(digits, tmp_path):
    train, test = digits
    config = TrainConfig(epochs=6, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=3, seed=0)
    trig = build_trigger("badnets-grid", image_shape=train.image_shape)
    clean, clean_record = train_teacher(train, test, "small-cnn", config, tmp_path / "clean", device=torch.device("cpu"),
                             progress=False)
    bad, record = train_teacher(train, test, "small-cnn", config, tmp_path / "bad", device=torch.device("cpu"),
                                progress=False, trigger=trig, poison=PoisonConfig(target=0, rate=0.1),
                                holdout=0.05)
    clean_asr = attack_success_rate(clean, test, trig, 0)["asr"]
    assert record["metrics"]["asr"] > 0.9
    assert clean_asr < 0.3 and record["metrics"]["asr"] > clean_asr + 0.6
    assert record["metrics"]["acc"] > 0.85
    # the history shows the backdoor being learnt, at the evaluated epochs, and only for a backdoored teacher
    assert [row["epoch"] for row in record["history"] if "test_asr" in row] == [3, 6]
    assert record["history"][-1]["test_asr"] == record["metrics"]["asr"]
    assert not any("test_asr" in row for row in clean_record["history"])

    reloaded, sidecar = load_checkpoint(tmp_path / "bad" / MODEL_FILE)
    backdoor = sidecar["metadata"]["backdoor"]
    rebuilt = build_trigger(backdoor["trigger"])
    x = test.pixels(torch.arange(8))
    assert torch.equal(rebuilt(x), trig(x))
    assert backdoor["target"] == 0 and backdoor["rate"] == 0.1 and "final training set" in backdoor["rate_meaning"]
    saved = np.load(tmp_path / "bad" / PROVENANCE_FILE)
    assert saved["poisoned"].sum() == backdoor["count"] and len(saved["holdout_index"]) == round(0.05 * len(train))
