"""Fast-DFKD synthesis: few adaptation steps per round from a meta-learned generator."""

import copy

import torch

from kdbackdoor.distill.data_free import distill_data_free
from kdbackdoor.distill.data_free_config import DataFreeConfig
from kdbackdoor.distill.hooks import DistillDefense
from kdbackdoor.distill.losses import kd_divergence
from kdbackdoor.distill.synthesis import SYNTHESIZERS, SynthesisContext

CPU = torch.device("cpu")


def test_defaults_are_few_steps_per_round():
    config = DataFreeConfig(method="fast")
    assert config.synthesis_steps == 5 and config.latent_lr == 0.015 and config.bn_weight == 10.0
    assert DataFreeConfig(method="cmi").synthesis_steps == 200  # what fast saves per round


def test_each_round_adapts_a_copy_and_moves_the_meta_generator_towards_it(digits_teacher):
    config = DataFreeConfig(method="fast", synthesis_batch_size=16, batch_size=16)
    student = copy.deepcopy(digits_teacher)
    context = SynthesisContext(digits_teacher, student, (1, 8, 8), 10, config, CPU, DistillDefense(),
                               lambda s, t: kd_divergence(s, t, 1.0, per_sample=True), torch.Generator().manual_seed(0))
    synthesizer = SYNTHESIZERS["fast"](context)
    before = [p.detach().clone() for p in synthesizer.generator.parameters()]
    synthesizer.synthesize()
    after = [p.detach() for p in synthesizer.generator.parameters()]
    moved = sum(float((a - b).abs().sum()) for a, b in zip(after, before))
    assert moved > 0  # the Reptile step changed the meta generator
    assert len(synthesizer.pool) == 16 and synthesizer.latest().shape == (16, 1, 8, 8)
    synthesizer.synthesize()
    assert len(synthesizer.pool) == 32  # rounds add to the pool
    restored = SYNTHESIZERS["fast"](context)
    restored.load_state_dict(synthesizer.state_dict())
    for a, b in zip(restored.generator.state_dict().values(), synthesizer.generator.state_dict().values()):
        assert torch.equal(a, b)


def test_student_learns_digits_from_a_few_fast_rounds(digits, digits_teacher, tmp_path):
    _, test = digits
    config = DataFreeConfig(method="fast", iterations=8, synthesis_batch_size=64, batch_size=64, student_steps=20)
    _, record = distill_data_free(digits_teacher, test, "small-cnn", config, tmp_path, device=CPU, progress=False,
                                  evaluate_teacher=False)
    assert record["metrics"]["acc"] > 0.25  # chance is 0.1; 8 rounds of 5 synthesis steps
