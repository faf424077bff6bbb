"""Teacher-side attacks built to survive distillation (ADBA-class, BackWeak-class) and NAD.

Digits, small-cnn, fixed seeds. The defining property of a distillation-surviving attack:
students distilled from its teacher on *clean* images carry its backdoor far more often than
students of a plain BadNets teacher whose own ASR is at least as high.
"""

import statistics

import pytest
import torch

from kdbackdoor.attacks.adba import ADBAConfig, adba_attack
from kdbackdoor.attacks.backweak import BackWeakConfig, backweak_attack
from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
from kdbackdoor.defenses.nad import NADConfig, clean_subset, nad_purify
from kdbackdoor.distill.losses import KDConfig, kd_loss
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.evaluate import accuracy, attack_success_rate
from kdbackdoor.models import build_model
from kdbackdoor.runtime import seed_everything
from kdbackdoor.teacher import train_teacher
from kdbackdoor.training import TrainConfig, fit
from kdbackdoor.triggers import build_trigger

CPU = torch.device("cpu")
RECIPE = dict(batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0)


def clean_kd_students(teacher, train, test, trigger, tmp_path, seeds=(0, 1), epochs=6):
    """(ACC, ASR) of small-cnn students distilled from ``teacher`` on clean ``train`` (λ = 1, T = 4)."""
    out = []
    for seed in seeds:
        seed_everything(seed)
        student = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8))
        fit(student, train, TrainConfig(epochs=epochs, seed=seed, **RECIPE), tmp_path / f"student{seed}",
            loss_fn=kd_loss(teacher, KDConfig(kd_lambda=1.0, temperature=4.0)), progress=False)
        out.append((accuracy(student, test)["acc"], attack_success_rate(student, test, trigger, 0)["asr"]))
    return out


@pytest.fixture(scope="module")
def badnets(digits, tmp_path_factory):
    """A plain BadNets teacher (10% poisons, target 0) and its students' (ACC, ASR)."""
    train, test = digits
    trigger = build_trigger("badnets-square", image_shape=train.image_shape)
    folder = tmp_path_factory.mktemp("badnets")
    teacher, _ = train_teacher(train, test, "small-cnn", TrainConfig(epochs=8, **RECIPE), folder, device=CPU,
                               progress=False, trigger=trigger, poison=PoisonConfig(rate=0.1))
    asr = attack_success_rate(teacher, test, trigger, 0)["asr"]
    return teacher, trigger, asr, clean_kd_students(teacher, train, test, trigger, folder)


@pytest.fixture(scope="module")
def clean_teacher(digits, tmp_path_factory):
    train, test = digits
    teacher, _ = train_teacher(train, test, "small-cnn", TrainConfig(epochs=8, **RECIPE),
                               tmp_path_factory.mktemp("clean"), device=CPU, progress=False)
    return teacher


def test_backweak_backdoor_reaches_clean_kd_students_where_badnets_does_not(digits, badnets, clean_teacher,
                                                                              tmp_path):
    train, test = digits
    _, _, badnets_teacher_asr, badnets_students = badnets
    teacher, trigger, record = backweak_attack(clean_teacher, train, BackWeakConfig(), tmp_path / "ft",
                                               device=CPU, progress=False)
    teacher_asr = attack_success_rate(teacher, test, trigger, 0)["asr"]
    students = clean_kd_students(teacher, train, test, trigger, tmp_path)
    assert record["clean_teacher_train_asr"] < 0.05  # weak: no adversarial effect on the clean teacher
    assert accuracy(teacher, test)["acc"] > 0.9
    assert 0.3 < teacher_asr <= badnets_teacher_asr + 0.02  # a weaker teacher backdoor than BadNets'...
    student_asr = statistics.mean(asr for _, asr in students)
    badnets_student_asr = statistics.mean(asr for _, asr in badnets_students)
    assert student_asr > badnets_student_asr + 0.2  # ...that its students inherit far more often
    assert min(acc for acc, _ in students) > 0.9


def test_adba_learnt_trigger_reaches_clean_kd_students_where_badnets_does_not(digits, badnets, tmp_path):
    train, test = digits
    _, _, badnets_teacher_asr, badnets_students = badnets
    config = ADBAConfig(initial_trigger="badnets-square:size=12", epochs=8)
    teacher, trigger, record = adba_attack(train, "small-cnn", config, tmp_path / "adba", device=CPU, progress=False)
    rebuilt = build_trigger(record["trigger"])  # the learnt trigger is a file-backed trigger like any other
    x = test.pixels(torch.arange(16))
    assert torch.allclose(rebuilt(x), trigger(x))
    outside = ~trigger.changed_mask()
    assert torch.equal(trigger(x)[:, :, outside], x[:, :, outside])  # only the mask's pixels change
    teacher_asr = attack_success_rate(teacher, test, trigger, 0)["asr"]
    assert accuracy(teacher, test)["acc"] > 0.8
    assert 0.8 < teacher_asr <= badnets_teacher_asr + 0.02
    students = clean_kd_students(teacher, train, test, trigger, tmp_path)
    student_asr = statistics.mean(asr for _, asr in students)
    assert student_asr > statistics.mean(asr for _, asr in badnets_students) + 0.2


def test_adba_refuses_a_full_image_initial_trigger(digits, tmp_path):
    with pytest.raises(KDBackdoorError, match="footprint"):
        adba_attack(digits[0], "small-cnn", ADBAConfig(initial_trigger="blend"), tmp_path, device=CPU,
                    progress=False)


def test_nad_attention_term_erases_far_more_of_a_badnets_backdoor_than_the_same_fine_tuning(digits, badnets,
                                                                                             tmp_path):
    import copy
    train, test = digits
    teacher, trigger, asr_before, _ = badnets
    results = {}
    for beta in (0.0, 1000.0):
        config = NADConfig(clean_size=150, teacher_epochs=5, epochs=10, crop_padding=1, hflip=False, beta=beta)
        purified, record = nad_purify(copy.deepcopy(teacher), train, config, tmp_path / str(beta), device=CPU,
                                      progress=False)
        assert record["clean_images"] == 150
        results[beta] = (accuracy(purified, test)["acc"], attack_success_rate(purified, test, trigger, 0)["asr"])
    assert asr_before > 0.9
    (acc_ft, asr_ft), (acc_nad, asr_nad) = results[0.0], results[1000.0]
    assert asr_nad < 0.45 and asr_nad < asr_ft - 0.25  # the attention term does the erasing, not the fine-tune
    assert acc_nad > accuracy(teacher, test)["acc"] - 0.08


def test_nad_clean_set_is_a_seeded_draw_capped_at_the_data(digits):
    train, _ = digits
    a, b, c = clean_subset(train, 100, 0), clean_subset(train, 100, 0), clean_subset(train, 100, 1)
    assert len(a) == 100 and torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert len(clean_subset(train, 10 ** 6, 0)) == len(train)
