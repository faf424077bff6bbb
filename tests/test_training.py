import pytest
import torch

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models import build_model
from kdbackdoor.numerics import to_layout
from kdbackdoor.runtime import seed_everything
from kdbackdoor.training import STATE_FILE, TrainConfig, cross_entropy_loss, fit, lr_factor


def test_onecycle_warms_up_then_decays_to_zero():
    values = [lr_factor("onecycle", s, 100, 0.2) for s in range(100)]
    peak = values.index(max(values))
    assert max(values) == pytest.approx(1.0)
    assert 15 <= peak <= 20
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))
    assert values[-1] < 0.02


def test_other_schedules():
    assert lr_factor("cosine", 0, 100, 0) == pytest.approx(1.0)
    assert lr_factor("cosine", 50, 100, 0) == pytest.approx(0.5)
    assert [lr_factor("step", s, 100, 0) for s in (10, 60, 90)] == pytest.approx([1, 0.1, 0.01])
    assert lr_factor("constant", 99, 100, 0) == 1.0


def _train(digits, out, epochs=3, compile=False, **kwargs):
    train, test = digits
    config = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, crop_padding=1, hflip=False, seed=3, compile=compile)
    seed_everything(config.seed)
    model = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8))
    history = fit(model, train, config, out, loss_fn=cross_entropy_loss(), test=test,
                  device=torch.device("cpu"), progress=False, **kwargs)
    return model, history


def test_fit_learns_digits(digits, tmp_path):
    model, history = _train(digits, tmp_path, epochs=4)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["test_acc"] > 0.85
    assert (tmp_path / STATE_FILE).exists()


def test_fit_trains_in_channels_last_layout_and_the_layout_leaves_outputs_unchanged(digits, tmp_path):
    model, _ = _train(digits, tmp_path, epochs=1)
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # many input channels
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()  # really NHWC, not a layout both orders share

    seed_everything(0)
    plain = build_model("wrn-16-1", num_classes=10, in_channels=3, input_size=(32, 32)).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = plain(x)
    after = to_layout(plain)(x)
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.slow  # compiling takes minutes on CPU
def test_compiled_training_learns_like_eager_training(digits, tmp_path):
    eager, eager_history = _train(digits, tmp_path / "eager", epochs=2)
    compiled, compiled_history = _train(digits, tmp_path / "compiled", epochs=2, compile=True)
    assert compiled_history[-1]["test_acc"] > 0.5  # chance is 0.1; 2 epochs give about 0.7
    assert abs(compiled_history[-1]["loss"] - eager_history[-1]["loss"]) < 0.05  # same recipe, same seed
    assert abs(compiled_history[-1]["test_acc"] - eager_history[-1]["test_acc"]) < 0.05
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # saved as the plain model


def test_same_seed_same_numbers(digits, tmp_path):
    _, first = _train(digits, tmp_path / "a", epochs=2)
    _, second = _train(digits, tmp_path / "b", epochs=2)
    assert [r["loss"] for r in first] == [r["loss"] for r in second]


def test_resume_after_interruption_matches_uninterrupted_run(digits, tmp_path):
    reference, ref_history = _train(digits, tmp_path / "ref", epochs=3)

    def crash_after_first_epoch(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(digits, tmp_path / "run", epochs=3, on_epoch_end=crash_after_first_epoch)
    resumed, history = _train(digits, tmp_path / "run", epochs=3, resume=True)
    assert [r["loss"] for r in history] == [r["loss"] for r in ref_history]
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_existing_state_is_not_overwritten_without_resume(digits, tmp_path):
    _train(digits, tmp_path, epochs=1)
    before = (tmp_path / STATE_FILE).read_bytes()
    with pytest.raises(KDBackdoorError, match="--resume"):
        _train(digits, tmp_path, epochs=1)
    assert (tmp_path / STATE_FILE).read_bytes() == before


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError):
        TrainConfig(unknown_key=1)


class _Hook:
    """A step hook whose extra gradient is ``scale``·θ (like weight decay); it counts its calls."""

    def __init__(self, scale: float) -> None:
        self.scale, self.steps, self.restored = scale, [], None

    def extra_gradients(self, model, optimizer, x, step, total):
        self.steps.append((step, total))
        return [self.scale * p.detach() for p in model.parameters() if p.requires_grad]

    def state_dict(self):
        return {"calls": len(self.steps)}

    def load_state_dict(self, state):
        self.restored = state


def test_step_hook_gradients_are_added_to_every_step(digits, tmp_path):
    plain, plain_history = _train(digits, tmp_path / "plain", epochs=2)
    zero = _Hook(0.0)
    _, zero_history = _train(digits, tmp_path / "zero", epochs=2, step_hook=zero)
    total = 2 * -(-len(digits[0]) // 64)
    assert zero.steps == [(s, total) for s in range(total)]  # once per step, numbered across epochs
    assert [r["loss"] for r in zero_history] == [r["loss"] for r in plain_history]  # adding zeros changes nothing
    shrunk, _ = _train(digits, tmp_path / "shrink", epochs=2, step_hook=_Hook(1.0))
    norm = lambda model: sum(float(p.detach().pow(2).sum()) for n, p in model.named_parameters() if n.endswith("weight"))
    assert norm(shrunk) < 0.8 * norm(plain)  # the hook's decay gradient was applied


def test_step_hook_state_is_saved_and_restored_on_resume(digits, tmp_path):
    def crash_after_first_epoch(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    first = _Hook(0.0)
    with pytest.raises(KeyboardInterrupt):
        _train(digits, tmp_path, epochs=2, step_hook=first, on_epoch_end=crash_after_first_epoch)
    resumed = _Hook(0.0)
    _train(digits, tmp_path, epochs=2, resume=True, step_hook=resumed)
    per_epoch = len(first.steps)
    assert resumed.restored == {"calls": per_epoch}
    assert [s for s, _ in resumed.steps] == list(range(per_epoch, 2 * per_epoch))  # the second epoch only
