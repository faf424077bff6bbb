import pytest
import torch

from kdbackdoor.attacks.pgd import pgd


def linear_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    return model.eval()


def test_targeted_linf_reaches_target_within_budget():
    model = linear_model()
    x = torch.rand(32, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    target = torch.full((32,), 2)
    adv = pgd(model, x, target, eps=0.3, step_size=0.05, steps=30, targeted=True,
              generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.3 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (model(adv).argmax(1) == 2).float().mean() > (model(x).argmax(1) == 2).float().mean() + 0.5


def test_untargeted_l2_leaves_true_class_and_respects_radius():
    model = linear_model()
    x = torch.rand(32, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    labels = model(x).argmax(1)
    adv = pgd(model, x, labels, eps=1.5, step_size=0.3, steps=20, norm="l2", random_start=False)
    assert (adv - x).flatten(1).norm(dim=1).max() <= 1.5 + 1e-5
    assert (model(adv).argmax(1) != labels).float().mean() > 0.8


def test_transform_is_applied_inside_the_loop():
    model = linear_model()
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    seen = []

    def transform(z):
        seen.append(z.shape)
        return z.flip(3)

    pgd(model, x, torch.zeros(16, dtype=torch.long), eps=0.1, step_size=0.05, steps=4, transform=transform)
    assert len(seen) == 4


def test_zero_steps_without_random_start_is_identity():
    model = linear_model()
    x = torch.rand(4, 3, 4, 4)
    assert torch.equal(pgd(model, x, torch.zeros(4, dtype=torch.long), eps=0.1, step_size=0.1, steps=0,
                           random_start=False), x)


class RowCounter(torch.nn.Module):
    """Wraps a model and counts the images it is shown."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += len(x)
        return self.model(x)


def test_stop_probability_freezes_images_that_reached_it_and_saves_their_steps():
    x = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    target = torch.full((64,), 2)
    settings = dict(eps=0.3, step_size=0.02, steps=30, targeted=True)
    full = RowCounter(linear_model())
    adv_full = pgd(full, x, target, generator=torch.Generator().manual_seed(0), **settings)
    early = RowCounter(linear_model())
    adv = pgd(early, x, target, generator=torch.Generator().manual_seed(0), stop_probability=0.3, **settings)
    assert full.rows == 64 * 30
    assert early.rows < full.rows * 0.8  # images left the batch once they reached 0.3
    with torch.no_grad():
        p_early = early.model(adv).softmax(1)[:, 2]
        p_full = full.model(adv_full).softmax(1)[:, 2]
    stopped = p_early >= 0.3
    assert stopped.float().mean() > 0.5
    # a frozen image is the iterate that reached the threshold, so full PGD pushed it further
    assert (p_full[stopped] >= p_early[stopped] - 1e-6).all() and (p_full[stopped] > p_early[stopped]).any()
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_stop_probability_needs_a_targeted_attack():
    x = torch.rand(4, 3, 4, 4)
    with pytest.raises(ValueError, match="targeted"):
        pgd(linear_model(), x, torch.zeros(4, dtype=torch.int64), eps=0.1, step_size=0.01, steps=2,
            stop_probability=0.5)
