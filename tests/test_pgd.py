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
