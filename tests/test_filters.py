"""Distillation-set filters: scoring, flag rules, planted poisons in digits, provenance blindness."""

import math

import pytest
import torch

from kdbackdoor.attacks.distill_poisoning import DistillPoisonConfig, craft_poisoned_set
from kdbackdoor.attacks.engines import build_engine
from kdbackdoor.attacks.injection import inject_poisons
from kdbackdoor.data.dataset import ImageDataset, Provenance, to_uint8
from kdbackdoor.defenses.filters import AuditContext, available_filters, build_filter, score_against_provenance
from kdbackdoor.defenses.filters.base import FilterResult, flag_outliers, flag_top_share
from kdbackdoor.defenses.strip import strip_entropy
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models import build_model
from kdbackdoor.runtime import cpu_generator, seed_everything
from kdbackdoor.training import TrainConfig, cross_entropy_loss, fit
from kdbackdoor.triggers import build_trigger

CPU = torch.device("cpu")
TARGET = 3
# Views that keep 8x8 digits readable (blur and crop-flip destroy them at this size).
DIGIT_VIEWS = {"kinds": ["noise", "jpeg"], "noise_sigma": 16 / 255, "jpeg_quality": 50}


def plant_pgd_poisons(teacher, train):
    """400 digits + 10% PGD poisons crafted against ``teacher`` (label = target 3), with the real
    attack; returns (poisoned set, trigger, attack config, attack report)."""
    engine = build_engine("pgd", eps=48 / 255, step_size=8 / 255, steps=20)
    trigger = build_trigger("badnets-square:size=2", image_shape=train.image_shape)
    config = DistillPoisonConfig(target=TARGET, rate=0.1)
    data, report = craft_poisoned_set(teacher, train.subset(torch.arange(400)), trigger, engine, config,
                                      progress=False)
    return data, trigger, config, report


@pytest.fixture(scope="module")
def pgd_set(digits, digits_teacher):
    return plant_pgd_poisons(digits_teacher, digits[0])[0]


@pytest.fixture(scope="module")
def dirty_label_set(digits):
    """400 digits + 15 triggered 7s relabelled as the target (BadNets-style dirty labels), the
    case spectral signatures and activation clustering were designed for."""
    train, _ = digits
    base = train.subset(torch.arange(400))
    rows = (base.labels == 7).nonzero().squeeze(1)[:15]
    trigger = build_trigger("badnets-square:size=3", image_shape=base.image_shape)
    images = to_uint8(trigger(base.pixels(rows)))
    return inject_poisons(base, rows, images, torch.full((15,), TARGET), "add")


@pytest.fixture(scope="module")
def reference_model(digits, tmp_path_factory):
    """A second digits model (other seed, fewer epochs) for the reference-model filter."""
    train, _ = digits
    seed_everything(1)
    model = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8))
    config = TrainConfig(epochs=4, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0, seed=1)
    fit(model, train, config, tmp_path_factory.mktemp("reference"), loss_fn=cross_entropy_loss(), progress=False)
    return model.eval()


def auroc(data, name, context, **params):
    result = build_filter(name, **params).detect(data, context)
    return score_against_provenance(result, data.provenance.poisoned)["auroc"]


def test_scoring_against_provenance_on_a_hand_made_case():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    truth = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 0, 0]).bool()
    flags, _ = flag_top_share(scores, 0.3)
    result = FilterResult("hand", scores, flags, "top 30%", {})
    metrics = score_against_provenance(result, truth)
    # positives .9 .8 .6 beat 7, 7 and 6 of the 7 negatives: 20 of 21 pairs
    assert metrics["auroc"] == pytest.approx(20 / 21)
    # no false positive is allowed at 5% FPR of 7 negatives: threshold .8 -> 2 of 3 poisons
    assert metrics["tpr_at_5fpr"] == pytest.approx(2 / 3)
    assert metrics["flagged"] == 3 and metrics["true_positives"] == 2
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 3)
    clean = score_against_provenance(result, torch.zeros(10, dtype=torch.bool))
    assert clean["auroc"] is None and clean["recall"] is None and clean["precision"] == 0


def test_flag_rules():
    flags, rule = flag_top_share(torch.arange(20.0), 0.1)
    assert flags.sum() == 2 and flags[18:].all() and "top 10.00%" in rule
    scores = torch.cat([torch.linspace(0, 1, 99), torch.tensor([25.0])])
    flags, _ = flag_outliers(scores)
    assert flags.nonzero().squeeze(1).tolist() == [99]
    with pytest.raises(KDBackdoorError, match="expected rate"):
        flag_top_share(scores, 1.5)


def test_label_disagreement_and_brittleness_catch_pgd_poisons(pgd_set, digits_teacher):
    context = AuditContext(digits_teacher, CPU)
    assert auroc(pgd_set, "label-disagreement", context) > 0.75
    assert auroc(pgd_set, "brittleness", context, **DIGIT_VIEWS) > 0.75


def test_reference_model_catches_pgd_poisons(pgd_set, digits_teacher, reference_model):
    context = AuditContext(digits_teacher, CPU, reference=reference_model)
    result = build_filter("reference-model").detect(pgd_set, context)
    metrics = score_against_provenance(result, pgd_set.provenance.poisoned)
    assert metrics["auroc"] > 0.9
    assert metrics["precision"] > 0.7 and metrics["recall"] > 0.5  # its own rule: the models' top-1 differ


def test_spectral_signatures_catch_dirty_label_poisons(dirty_label_set, digits_teacher):
    assert auroc(dirty_label_set, "spectral", AuditContext(digits_teacher, CPU), group_by="label") > 0.8


def test_activation_clustering_flags_the_small_cluster(dirty_label_set, digits_teacher):
    result = build_filter("activation-clustering", group_by="label").detect(
        dirty_label_set, AuditContext(digits_teacher, CPU))
    metrics = score_against_provenance(result, dirty_label_set.provenance.poisoned)
    assert metrics["auroc"] > 0.9 and metrics["recall"] > 0.9
    assert result.details["smaller_cluster_share_per_class"][str(TARGET)] < 0.35


class MarkerModel(torch.nn.Module):
    """Confident class 0 when the top-left pixel is bright (a trigger), uniform over 4 classes otherwise."""

    num_classes, in_channels = 4, 1

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        marked = (x[:, 0, 0, 0] > 0.4).float()[:, None]
        return marked * torch.tensor([20.0, 0, 0, 0]) + 0 * self.dummy


def marked_set(n=40, marked=8):
    images = torch.randint(0, 200, (n, 1, 6, 6), dtype=torch.uint8)
    images[:, 0, 0, 0] = 0
    images[:marked, 0, 0, 0] = 255
    labels = torch.zeros(n, dtype=torch.long)
    prov = Provenance(torch.arange(n) < marked, torch.arange(n), labels.clone())
    return ImageDataset(images, labels, [f"c{i}" for i in range(4)], "marked", provenance=prov)


def test_strip_entropy_separates_triggered_inputs_and_is_reproducible():
    data = marked_set()
    x = data.pixels()
    overlays = x[20:]  # unmarked: blending keeps a marked pixel at >= 0.5, an unmarked one at <= 0.4
    entropy = strip_entropy(MarkerModel(), x, overlays, n=6, generator=cpu_generator(0))
    assert entropy.shape == (40,)
    assert entropy[:8].max() < 1e-3
    assert entropy[8:].min() == pytest.approx(math.log(4), abs=1e-4)
    again = strip_entropy(MarkerModel(), x, overlays, n=6, generator=cpu_generator(0), batch_size=7)
    assert torch.allclose(entropy, again)
    with pytest.raises(KDBackdoorError, match="overlays"):
        strip_entropy(MarkerModel(), x, torch.rand(3, 1, 5, 5))


def test_strip_filter_ranks_triggered_samples_first():
    data = marked_set()
    result = build_filter("strip", blends=4, pool=40).detect(data, AuditContext(MarkerModel(), CPU))
    assert score_against_provenance(result, data.provenance.poisoned)["auroc"] > 0.95


LIGHT = {"strip": {"blends": 2, "pool": 64}, "brittleness": {"kinds": ["noise", "jpeg"], "draws": 1}}


def test_filters_never_read_the_provenance(pgd_set, digits_teacher, reference_model):
    """Same scores and flags whether the provenance is true, inverted or absent."""
    context = AuditContext(digits_teacher, CPU, reference=reference_model)
    inverted = Provenance(~pgd_set.provenance.poisoned, pgd_set.provenance.source_index.flip(0),
                          pgd_set.provenance.original_label.flip(0))
    variants = [ImageDataset(pgd_set.images, pgd_set.labels, pgd_set.classes, "v", provenance=p)
                for p in (inverted, None)]
    for name in available_filters():
        params = LIGHT.get(name, {})
        first = build_filter(name, **params).detect(pgd_set, context)
        for variant in variants:
            other = build_filter(name, **params).detect(variant, context)
            assert torch.equal(first.scores, other.scores) and torch.equal(first.flags, other.flags), name


def test_expected_rate_sets_the_flag_count(pgd_set, digits_teacher):
    result = build_filter("label-disagreement").detect(pgd_set, AuditContext(digits_teacher, CPU), 0.1)
    assert int(result.flags.sum()) == math.ceil(0.1 * len(pgd_set))
    assert result.scores[result.flags].min() >= result.scores[~result.flags].max()


def test_bad_filter_requests_are_refused(pgd_set, digits_teacher):
    with pytest.raises(KDBackdoorError, match="unknown filter 'nope'.*brittleness"):
        build_filter("nope")
    with pytest.raises(KDBackdoorError, match="needs a second model"):
        build_filter("reference-model").detect(pgd_set, AuditContext(digits_teacher, CPU))
    with pytest.raises(KDBackdoorError, match="brittleness.*noise_sigma"):
        build_filter("brittleness", noise_sigma=3.0)
    with pytest.raises(KDBackdoorError, match="allowed"):
        build_filter("strip", colour="red")
