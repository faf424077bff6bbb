"""ABD for data-free distillation: Shuffling Vaccine, Self-Retrospection, hyper-gradient, wiring."""

import pytest
import torch

from kdbackdoor.defenses.abd import CombinedDefense
from kdbackdoor.distill.hooks import build_defense
from kdbackdoor.defenses.hypergradient import implicit_hypergradient
from kdbackdoor.defenses.self_retrospection import SelfRetrospection, SelfRetrospectionConfig, output_change
from kdbackdoor.defenses.shuffling_vaccine import (IGNORED_BATCHES, ShufflingVaccine, ShufflingVaccineConfig,
                                                   SuspectEnsemble, tail_ratio)
from kdbackdoor.distill.data_free import distill_data_free
from kdbackdoor.distill.data_free_config import DataFreeConfig
from kdbackdoor.distill.hooks import StudentStep
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models import build_model
from kdbackdoor.models.batchnorm import preserved_batchnorm_statistics
from kdbackdoor.runtime import cpu_generator, seed_everything

CPU = torch.device("cpu")


def test_hypergradient_matches_the_closed_form_of_a_quadratic_problem():
    """Inner: δ*(θ) = argmin ½‖δ − Aθ‖² = Aθ. Outer: ½‖δ‖² + c·θ, so dL/dθ = Aᵀ A θ + c."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g)
    theta = torch.randn(3, generator=g, requires_grad=True)
    c = torch.randn(3, generator=g)
    delta_star = (a @ theta).detach()
    grads = implicit_hypergradient([theta], delta_star, lambda d: 0.5 * (d - a @ theta).pow(2).sum(),
                                   lambda d: 0.5 * d.pow(2).sum() + (c * theta).sum(), inner_lr=0.5, iterations=40)
    expected = a.T @ a @ theta.detach() + c
    assert torch.allclose(grads[0], expected, atol=1e-5)
    # the part through δ matters: without it the gradient would be c alone
    assert not torch.allclose(grads[0], c, atol=1e-2)
    truncated = implicit_hypergradient([theta], delta_star, lambda d: 0.5 * (d - a @ theta).pow(2).sum(),
                                       lambda d: 0.5 * d.pow(2).sum() + (c * theta).sum(), inner_lr=0.5, iterations=1)
    assert not torch.allclose(truncated[0], expected, atol=1e-2)


def test_preserved_batchnorm_statistics_restores_running_buffers():
    model = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    with preserved_batchnorm_statistics(model):
        model(torch.rand(16, 1, 8, 8))
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert changed  # the pass did use batch statistics and moved the buffers ...
    for key, value in model.state_dict().items():  # ... and they are back
        if key in before:
            assert torch.equal(before[key], value), key


def test_suspect_permutes_input_channels_of_the_last_stage_only(digits_teacher):
    suspect = SuspectEnsemble(digits_teacher, copies=2, layers=None, generator=cpu_generator(0))
    assert suspect.layer_names == ["backbone.stages.2.0"]
    original = dict(digits_teacher.named_parameters())
    for copy in suspect.copies:
        for name, param in copy.named_parameters():
            if name == "backbone.stages.2.0.weight":
                assert not torch.equal(param, original[name])
                # the same filters with their input channels in another order
                assert torch.equal(param.sort(dim=1).values, original[name].sort(dim=1).values)
            else:
                assert torch.equal(param, original[name]), name
    assert SuspectEnsemble(digits_teacher, 1, layers=2, generator=cpu_generator(0)).layer_names == [
        "backbone.stages.1.0.0", "backbone.stages.2.0"]
    with pytest.raises(KDBackdoorError, match="convolutions"):
        SuspectEnsemble(digits_teacher, 1, layers=99, generator=cpu_generator(0))


def test_tail_ratio_counts_samples_far_below_the_rest():
    g = torch.Generator().manual_seed(0)
    typical = 10 ** (torch.randn(1000, generator=g) * 0.1)  # log10 around 0, std 0.1
    assert tail_ratio(typical) < 0.01
    with_tail = torch.cat([typical, torch.full((40,), 1e-3)])  # 40 samples at log10 = -3
    assert tail_ratio(with_tail) == pytest.approx(40 / 1040)


def test_vaccine_waits_for_the_tail_test_then_penalises_agreeing_samples(backdoored_digits_teacher, digits):
    teacher, trigger, _ = backdoored_digits_teacher
    _, test = digits
    vaccine = ShufflingVaccine(ShufflingVaccineConfig(test_batches=IGNORED_BATCHES + 4, seed=0))
    vaccine.setup(teacher, None, CPU)
    clean = test.pixels(torch.arange(64))
    for i in range(IGNORED_BATCHES + 4):
        batch = torch.cat([clean, trigger.apply(clean[:8])]) if i >= IGNORED_BATCHES else clean
        assert vaccine.synthesis_loss(batch, teacher(batch)) is None  # no term while testing
    record = vaccine.record()
    assert record["enabled"] is True and record["tail_ratios"][-1] > 0.02
    images = trigger.apply(clean[:16]).requires_grad_(True)
    term = vaccine.synthesis_loss(images, teacher(images))
    assert term is not None and float(term) < 0
    term.backward()
    assert images.grad.abs().sum() > 0  # it steers synthesis


def test_vaccine_without_tail_test_is_on_from_the_start(digits_teacher, digits):
    vaccine = ShufflingVaccine(ShufflingVaccineConfig(tail_test=False))
    vaccine.setup(digits_teacher, None, CPU)
    images = digits[1].pixels(torch.arange(32))
    vaccine.synthesis_loss(images, digits_teacher(images))
    assert vaccine.record()["enabled"] is True and vaccine.record()["penalised_share"] is not None


def _student_step(student, teacher):
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)

    def loss(images, weights=None):
        return output_change(student(images), teacher(images))

    return StudentStep(student, teacher, optimizer, loss)


def test_self_retrospection_step_learns_and_keeps_batchnorm_statistics(digits_teacher, digits):
    images = digits[1].pixels(torch.arange(32))
    seed_everything(0)
    plain_student = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8)).train()
    sr_student = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8)).train()
    sr_student.load_state_dict(plain_student.state_dict())
    _student_step(plain_student, digits_teacher).run(images)
    defense = SelfRetrospection(SelfRetrospectionConfig(rounds=3, portion=0.25))
    defense.setup(digits_teacher, sr_student, CPU)
    loss = defense.student_step(_student_step(sr_student, digits_teacher), images, None)
    assert loss is not None and defense.steps == 1
    assert defense.last_change > 0  # the perturbation does change the student's output
    plain, defended = plain_student.state_dict(), sr_student.state_dict()
    for key in plain:
        if "running" in key or "num_batches" in key:  # only the clean pass moved the statistics
            assert torch.equal(plain[key], defended[key]), key
    weights_differ = any(not torch.equal(plain[k], defended[k]) for k in plain if k.endswith("weight"))
    assert weights_differ  # the unlearning gradient was applied on top of the plain one


def test_self_retrospection_unlearns_an_inherited_backdoor(backdoored_digits_teacher, digits):
    """Fine-tune a copy of a backdoored model by distillation from it on clean images: plain steps
    keep the backdoor, Self-Retrospection (default settings) removes most of it and keeps ACC."""
    import copy
    from kdbackdoor.evaluate import accuracy, attack_success_rate
    teacher, trigger, _ = backdoored_digits_teacher
    train, test = digits
    results = {}
    for defended in (False, True):
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        step = StudentStep(student, teacher, torch.optim.Adam(student.parameters(), lr=1e-3),
                           lambda x, w: output_change(student(x), teacher(x)))
        defense = SelfRetrospection()
        defense.setup(teacher, student, CPU)
        draws = torch.Generator().manual_seed(0)
        for _ in range(30):
            images = train.pixels(torch.randint(len(train), (32,), generator=draws))
            defense.student_step(step, images, None) if defended else step.run(images)
        student.eval()
        results[defended] = (accuracy(student, test)["acc"], attack_success_rate(student, test, trigger, 0)["asr"])
    assert results[False][1] >= 0.9  # plain distillation keeps the backdoor
    assert results[True][1] <= 0.5 and results[True][0] >= 0.85, results


def test_self_retrospection_waits_for_its_start(digits_teacher):
    defense = SelfRetrospection(SelfRetrospectionConfig(start=0.5))
    defense.setup(digits_teacher, None, CPU)
    defense.on_iteration(4, 10)
    student = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8)).train()
    step = _student_step(student, digits_teacher)
    assert defense.student_step(step, torch.rand(4, 1, 8, 8), None) is None  # plain step before the start
    assert defense.steps == 0
    defense.on_iteration(5, 10)
    assert defense.active


def test_self_retrospection_phase_restarts_the_learning_rate_with_a_cosine(digits_teacher):
    import math
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for phase_lr, expected in ((1e-3, [1e-3, 1e-3 * (1 + math.cos(math.pi * 0.8)) / 2]), (None, [0.1, 0.1])):
        student = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8)).train()
        step = _student_step(student, digits_teacher)
        defense = SelfRetrospection(SelfRetrospectionConfig(rounds=1, start=0.5, phase_lr=phase_lr))
        defense.setup(digits_teacher, student, CPU)
        seen = []
        for iteration in (5, 9):  # the phase is iterations 5-9 of 10
            defense.on_iteration(iteration, 10)
            defense.student_step(step, images, None)
            seen.append(step.optimizer.param_groups[0]["lr"])
        assert seen == pytest.approx(expected), phase_lr


def test_perturbation_search_finds_a_larger_change_than_random_noise(digits_teacher, digits):
    images = digits[1].pixels(torch.arange(64))
    defense = SelfRetrospection(SelfRetrospectionConfig(rounds=20))
    delta = defense.search_perturbation(digits_teacher, images)
    with torch.no_grad():
        reference = digits_teacher(images)
        searched = output_change(digits_teacher(images + delta), reference)
        noise = delta.abs().mean() * torch.randn(1, *images.shape[1:], generator=torch.Generator().manual_seed(0))
        random = output_change(digits_teacher(images + noise), reference)
    assert float(searched) > 2 * float(random)


def test_abd_combines_both_halves_and_runs_in_data_free_distillation(backdoored_digits_teacher, digits, tmp_path):
    teacher, _, _ = backdoored_digits_teacher
    defense = build_defense("abd", vaccine=ShufflingVaccineConfig(tail_test=False),
                            retrospection=SelfRetrospectionConfig(rounds=2))
    assert isinstance(defense, CombinedDefense)
    config = DataFreeConfig(method="zskt", iterations=3, batch_size=16, student_steps=2)
    _, record = distill_data_free(teacher, digits[1], "small-cnn", config, tmp_path, device=CPU, progress=False,
                                  evaluate_teacher=False, defense=defense)
    sv, sr = record["defense"]["parts"]
    assert record["defense"]["name"] == "abd" and sv["enabled"] is True and sr["steps"] == 6
    # each half says how long its own work took: the overhead, as a share of the run's wall time
    assert 0 < sv["seconds_this_run"] and 0 < sr["seconds_this_run"]
    assert sv["seconds_this_run"] + sr["seconds_this_run"] < record["wall_seconds_this_run"]
    assert build_defense("none") is None
    with pytest.raises(KDBackdoorError, match="abd, sv, sr"):
        build_defense("strip")


def test_vaccine_marks_triggered_transfer_images(backdoored_digits_teacher, digits):
    """OOD use: the tail test runs on the transfer set and backdoor-like images are marked."""
    from kdbackdoor.data.dataset import ImageDataset, to_uint8
    from kdbackdoor.defenses.shuffling_vaccine import suspect_transfer_images
    teacher, trigger, _ = backdoored_digits_teacher
    train, _ = digits
    clean = train.pixels(torch.arange(400))
    images = torch.cat([clean, trigger.apply(clean[:40])])
    transfer = ImageDataset(to_uint8(images), torch.zeros(440, dtype=torch.long), classes=["?"], name="transfer")
    suspicious, record = suspect_transfer_images(teacher, transfer, ShufflingVaccineConfig(seed=0), device=CPU)
    assert record["enabled"] is True and record["suspicious"] == int(suspicious.sum())
    triggered, clean_share = suspicious[400:].float().mean(), suspicious[:400].float().mean()
    assert triggered > 0.5 and triggered > 3 * clean_share


def test_cli_defenses_for_data_free_distillation(monkeypatch, capsys, tmp_path):
    import json

    from test_cli import run
    code, _, err = run(monkeypatch, capsys, "train-teacher", "--out", tmp_path / "t", "--epochs", "2",
                       "--no-progress", "--eval-every", "0")
    assert code == 0, err
    base = ["distill", "--teacher", tmp_path / "t", "--iterations", "2", "--batch-size", "8", "--student-steps", "1",
            "--no-progress"]
    abd = [*base, "--method", "dfad", "--defense", "abd", "--sr-rounds", "2", "--no-sv-tail-test", "--out",
           tmp_path / "abd"]
    code, out, err = run(monkeypatch, capsys, *abd)
    assert code == 0, err
    record = json.loads((tmp_path / "abd" / "metrics.json").read_text())
    assert [part["name"] for part in record["defense"]["parts"]] == ["sv", "sr"]
    assert record["defense"]["parts"][1]["config"]["rounds"] == 2
    assert "s this run)" in out
    code, out, err = run(monkeypatch, capsys, *abd, "--resume")  # a resumed run's times are only its last part's
    assert code == 0, err
    assert "s this run, from iteration 2)" in " ".join(out.split())  # rich wraps long lines
    code, _, err = run(monkeypatch, capsys, *base, "--method", "dataset", "--defense", "sr", "--out", tmp_path / "x")
    assert code == 2 and "--defense sr works with --method" in err
    code, _, err = run(monkeypatch, capsys, *base, "--method", "zskt", "--defense", "sv", "--sv-copies", "0",
                       "--out", tmp_path / "y")
    assert code == 2 and "--sv-copies" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_abd_for_ood_distillation_filters_the_transfer_set_then_unlearns(backdoored_digits_teacher, digits,
                                                                          tmp_path):
    """OOD KD (a data set as transfer set): the vaccine marks images before training (pushed away
    from, or dropped), and Self-Retrospection runs as a step hook from its start on."""
    from kdbackdoor.distill.dataset_kd import distill
    from kdbackdoor.distill.losses import KDConfig
    from kdbackdoor.training import TrainConfig
    teacher, trigger, _ = backdoored_digits_teacher
    train, test = digits
    transfer = train.subset(torch.arange(200), name="transfer")
    config = TrainConfig(epochs=2, batch_size=50, lr=0.05, crop_padding=0, hflip=False, eval_every=0)
    _, record = distill(teacher, transfer, test, "small-cnn", config, KDConfig(kd_lambda=1.0), tmp_path / "abd",
                        device=CPU, progress=False, evaluate_teacher=False,
                        defense=build_defense("abd", vaccine=ShufflingVaccineConfig(tail_test=False),
                                              retrospection=SelfRetrospectionConfig(rounds=2, start=0.5)))
    sv, sr = record["defense"]["parts"]
    assert record["defense"]["name"] == "abd" and sv["enabled"] is True and sv["pushed"] > 0
    assert record["train"]["size"] == 200  # pushed away from, not dropped
    assert sr["steps"] == 4  # the second half of 2 epochs × 4 steps
    assert 0 < sv["seconds_this_run"] and 0 < sr["seconds_this_run"]
    assert sv["seconds_this_run"] + sr["seconds_this_run"] < record["wall_seconds_this_run"]
    _, record = distill(teacher, transfer, test, "small-cnn", config, KDConfig(kd_lambda=1.0), tmp_path / "drop",
                        device=CPU, progress=False, evaluate_teacher=False,
                        defense=build_defense("sv", vaccine=ShufflingVaccineConfig(tail_test=False,
                                                                                    transfer_action="drop")))
    assert record["defense"]["name"] == "sv" and record["defense"]["dropped"] == sv["pushed"]
    assert record["train"]["size"] == 200 - sv["pushed"]
    _, record = distill(teacher, transfer, test, "small-cnn", config, KDConfig(kd_lambda=1.0), tmp_path / "sr",
                        device=CPU, progress=False, evaluate_teacher=False,
                        defense=build_defense("sr", retrospection=SelfRetrospectionConfig(rounds=1)))
    assert record["defense"]["name"] == "sr" and record["defense"]["steps"] == 8 and record["train"]["size"] == 200
