"""The distillation-set attack: sources, verification, injection, labels, provenance, storage."""

import json

import numpy as np
import pytest
import torch

from kdbackdoor.attacks.distill_poisoning import DistillPoisonConfig, craft_poisoned_set
from kdbackdoor.attacks.engines import build_engine
from kdbackdoor.data.poisoned_set import is_poisoned_set, load_poisoned_set, save_poisoned_set
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.triggers import build_trigger

STRONG = {"eps": 48 / 255, "step_size": 8 / 255, "steps": 20}


@pytest.fixture(scope="module")
def small_train(digits):
    train, _ = digits
    return train.subset(torch.arange(400), name="digits[:400]")


def trigger_for(data, spec="badnets-square:size=8"):
    return build_trigger(spec, image_shape=data.image_shape)


def poison(teacher, data, engine_params=STRONG, **config):
    engine = build_engine("pgd", **engine_params)
    return craft_poisoned_set(teacher, data, trigger_for(data), engine, DistillPoisonConfig(**config),
                              progress=False)


def teacher_target_probability(teacher, images_uint8, target):
    with torch.no_grad():
        return teacher(images_uint8.float() / 255).softmax(1)[:, target]


def test_add_mode_appends_verified_poisons_with_provenance(digits_teacher, small_train):
    poisoned, report = poison(digits_teacher, small_train, target=3, rate=0.1, mode="add")
    counts = report["counts"]
    n = len(small_train)
    assert counts["requested"] == round(0.1 * n / 0.9)
    assert counts["kept"] == counts["requested"]
    assert len(poisoned) == n + counts["kept"] == counts["final_size"]
    assert counts["achieved_rate"] == pytest.approx(counts["kept"] / len(poisoned))
    prov = poisoned.provenance
    assert not prov.poisoned[:n].any() and prov.poisoned[n:].all()
    assert torch.equal(poisoned.images[:n], small_train.images)  # the clean part is untouched
    rows = prov.source_index[n:]
    assert torch.equal(prov.original_label[n:], small_train.labels[rows])
    assert (prov.original_label[n:] != 3).all()  # sources are non-target images
    assert (poisoned.labels[n:] == 3).all()  # label mode 'target'
    # every stored poison passes verification on exactly the stored pixels
    p = teacher_target_probability(digits_teacher, poisoned.images[n:], 3)
    assert (p >= 0.5).all()
    # the report's "with trigger" figures are the teacher's probabilities on those stored poisons
    assert report["teacher_stability"]["poison_with_trigger"]["mean"] == pytest.approx(float(p.mean()), abs=1e-5)
    assert report["teacher_stability"]["poison_with_trigger"]["min"] == pytest.approx(float(p.min()), abs=1e-5)
    assert report["teacher_stability"]["clean_source"]["mean"] < 0.2
    # the stored poison is source + bounded perturbation + trigger
    trigger = trigger_for(small_train)
    outside = ~trigger.changed_mask()
    delta = (poisoned.images[n:].float() - small_train.images[rows].float())[..., outside]
    assert delta.abs().max() <= round(48) + 1


def test_replace_mode_keeps_the_size(digits_teacher, small_train):
    poisoned, report = poison(digits_teacher, small_train, rate=0.05, mode="replace")
    assert len(poisoned) == len(small_train)
    prov = poisoned.provenance
    rows = prov.poisoned.nonzero().squeeze(1)
    assert len(rows) == report["counts"]["kept"] == round(0.05 * len(small_train))
    assert torch.equal(prov.source_index, torch.arange(len(small_train)))  # poisons sit at their source's row
    assert not torch.equal(poisoned.images[rows], small_train.images[rows])
    clean = ~prov.poisoned
    assert torch.equal(poisoned.images[clean], small_train.images[clean])


@pytest.mark.parametrize("label_mode", ["target", "teacher", "original"])
def test_label_modes(label_mode, digits_teacher, small_train):
    poisoned, _ = poison(digits_teacher, small_train, target=2, rate=0.05, label_mode=label_mode)
    mask = poisoned.provenance.poisoned
    labels = poisoned.labels[mask]
    if label_mode == "target":
        assert (labels == 2).all()
    elif label_mode == "original":
        assert torch.equal(labels, poisoned.provenance.original_label[mask])
    else:
        with torch.no_grad():
            predicted = digits_teacher(poisoned.images[mask].float() / 255).argmax(1)
        assert torch.equal(labels, predicted)
        assert (labels == 2).float().mean() > 0.5  # verified poisons are mostly predicted as the target


def test_source_classes_restrict_the_draw(digits_teacher, small_train):
    poisoned, report = poison(digits_teacher, small_train, target=0, rate=0.03, source_classes=[4, 7])
    originals = poisoned.provenance.original_label[poisoned.provenance.poisoned]
    assert set(originals.tolist()) <= {4, 7} and len(originals) > 0
    assert report["source_classes"] == [4, 7]


def test_failures_are_retried_then_dropped_and_counted(digits_teacher, small_train):
    weak = {"eps": 6 / 255, "step_size": 2 / 255, "steps": 5}
    poisoned, report = poison(digits_teacher, small_train, engine_params=weak, rate=0.05, threshold=0.6,
                              retries=1)
    counts = report["counts"]
    assert counts["dropped"] > 0
    assert counts["tried"] == counts["kept"] + counts["dropped"]
    assert counts["tried"] < counts["attempts"] <= 2 * counts["tried"]  # failures got one more attempt
    assert int(poisoned.provenance.poisoned.sum()) == counts["kept"]
    with pytest.raises(KDBackdoorError, match="no poison passed verification"):
        poison(digits_teacher, small_train, engine_params={"eps": 1 / 255, "steps": 1}, rate=0.05,
               threshold=0.999, retries=0)


def test_the_same_seed_gives_the_same_poisons(digits_teacher, small_train):
    first, _ = poison(digits_teacher, small_train, rate=0.05, seed=4)
    again, _ = poison(digits_teacher, small_train, rate=0.05, seed=4)
    other, _ = poison(digits_teacher, small_train, rate=0.05, seed=5)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)


class CountingTeacher(torch.nn.Module):
    """The digits teacher, counting the images it is shown."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.rows = teacher, 0
        self.num_classes, self.in_channels, self.input_size = teacher.num_classes, teacher.in_channels, \
            teacher.input_size

    def forward(self, x):
        self.rows += len(x)
        return self.teacher(x)


def test_early_exit_keeps_verified_poisons_at_a_fraction_of_the_teacher_passes(digits_teacher, small_train):
    results = {}
    for early_exit in (False, True):
        teacher = CountingTeacher(digits_teacher)
        poisoned, report = poison(teacher, small_train, target=3, rate=0.1, early_exit=early_exit)
        results[early_exit] = (teacher.rows, poisoned, report)
    (rows_full, _, full), (rows_early, poisoned, early) = results[False], results[True]
    assert early["counts"]["kept"] == full["counts"]["kept"] == early["counts"]["requested"]
    n = len(small_train)
    assert (teacher_target_probability(digits_teacher, poisoned.images[n:], 3) >= 0.5).all()  # still verified
    # most poisons reach the threshold within a few of the 20 steps (measured: 991 teacher rows against
    # 1583; poisons that never verify and the verification and stability passes cost the same)
    assert rows_early < 0.75 * rows_full
    # the price: poisons that stopped at the threshold carry the target less strongly
    assert early["teacher_stability"]["poison_with_trigger"]["mean"] < full["teacher_stability"][
        "poison_with_trigger"]["mean"]


def test_early_exit_is_refused_for_engines_without_it(digits_teacher, small_train):
    engine = build_engine("fgsm")
    with pytest.raises(KDBackdoorError, match="early exit is not supported by the fgsm engine"):
        craft_poisoned_set(digits_teacher, small_train, trigger_for(small_train), engine,
                           DistillPoisonConfig(early_exit=True), progress=False)


@pytest.mark.parametrize("config,message", [
    ({"target": 10}, "target 10 out of range"),
    ({"source_classes": [0]}, "differ from the target"),
    ({"source_classes": [12]}, r"must be in \[0, 9\]"),
    ({"rate": 0.9, "mode": "replace", "source_classes": [1]}, "needs .* source images"),
])
def test_inconsistent_requests_are_refused(config, message, digits_teacher, small_train):
    with pytest.raises(KDBackdoorError, match=message):
        poison(digits_teacher, small_train, **config)


def test_rate_outside_the_open_interval_is_refused():
    for rate in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError):
            DistillPoisonConfig(rate=rate)


def test_mismatched_teacher_trigger_or_oversized_trigger_are_refused(digits_teacher, small_train):
    engine = build_engine("pgd", **STRONG)
    config = DistillPoisonConfig()
    wrong_shape = build_trigger("badnets-square", image_shape=(3, 32, 32))
    with pytest.raises(KDBackdoorError, match="trigger built for images"):
        craft_poisoned_set(digits_teacher, small_train, wrong_shape, engine, config, progress=False)
    rgb = load_dataset("npz:" + str(_rgb_npz(small_train)), "train")
    with pytest.raises(KDBackdoorError, match="channels"):
        craft_poisoned_set(digits_teacher, rgb, trigger_for(rgb), engine, config, progress=False)
    with pytest.raises(KDBackdoorError):
        build_trigger("badnets-square:size=40", image_shape=small_train.image_shape)


def _rgb_npz(data, path=None):
    import tempfile
    path = path or tempfile.mkdtemp()
    x = data.images.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    file = f"{path}/train.npz"
    np.savez(file, x=x, y=data.labels.numpy())
    return file


def test_poisoned_set_round_trip_and_integrity(digits_teacher, small_train, tmp_path):
    poisoned, report = poison(digits_teacher, small_train, rate=0.05)
    manifest_path = save_poisoned_set(poisoned, tmp_path / "set", {"counts": report["counts"], "target": 0})
    assert is_poisoned_set(tmp_path / "set") and is_poisoned_set(manifest_path)
    assert not is_poisoned_set(tmp_path)
    loaded, manifest = load_poisoned_set(tmp_path / "set")
    assert torch.equal(loaded.images, poisoned.images) and torch.equal(loaded.labels, poisoned.labels)
    for field in ("poisoned", "source_index", "original_label"):
        assert torch.equal(getattr(loaded.provenance, field), getattr(poisoned.provenance, field))
    assert manifest["counts"] == report["counts"] and manifest["poisoned"] == report["counts"]["kept"]
    assert loaded.classes == small_train.classes
    # the npz also loads as a plain data set
    plain = load_dataset(f"npz:{tmp_path / 'set' / 'poisoned.npz'}", "train")
    assert torch.equal(plain.images, poisoned.images)
    # tampering with the data is detected through the manifest's digest
    manifest["data_sha256"] = "0" * 64
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KDBackdoorError, match="sha256"):
        load_poisoned_set(tmp_path / "set")


@pytest.mark.slow  # about 1.5 min; the default run checks the same effect through the demo (test_demo)
def test_the_attack_plants_the_trigger_in_a_distilled_student(digits, digits_teacher, tmp_path):
    """Fixed seeds, digits: a student distilled (λ = 0.5) on the poisoned set answers the trigger
    with the target far more often than a student distilled on the same set without poisons.

    Measured at these seeds: ASR 28.8% poisoned vs 0.0% unpoisoned (λ = 1: 5.3% vs 0.0%). The
    student architecture differs from the teacher's: with the same architecture the student
    copies the teacher's reading of the adversarial perturbation itself and ignores the
    trigger (0% ASR in our runs; see docs/distill-attack.md)."""
    from kdbackdoor.distill.dataset_kd import distill
    from kdbackdoor.distill.losses import KDConfig
    from kdbackdoor.distill.record import Backdoor
    from kdbackdoor.training import TrainConfig

    train, test = digits
    trigger = trigger_for(train, "badnets-square:size=12")
    poisoned, _ = craft_poisoned_set(digits_teacher, train, trigger, build_engine("pgd", eps=48 / 255,
                                     step_size=12 / 255, steps=20), DistillPoisonConfig(rate=0.2), progress=False)
    config = TrainConfig(epochs=15, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0)
    asr = {}
    for name, data in (("poisoned", poisoned), ("clean", poisoned.subset(~poisoned.provenance.poisoned))):
        _, record = distill(digits_teacher, data, test, "wrn-16-1", config, KDConfig(kd_lambda=0.5),
                            tmp_path / name, device=torch.device("cpu"), backdoor=Backdoor(trigger, 0),
                            evaluate_teacher=False, progress=False)
        asr[name] = record["metrics"]["asr"]
        assert record["metrics"]["acc"] > 0.9  # the poisons cost no clean accuracy
    assert asr["clean"] < 0.05
    assert asr["poisoned"] > asr["clean"] + 0.15
