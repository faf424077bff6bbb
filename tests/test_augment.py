import torch

from kdbackdoor.data.augment import augment, random_crop, random_hflip


def test_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) / 1000
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_crop_draws_differ_per_image_and_are_seeded():
    x = torch.rand(64, 1, 8, 8)
    a = random_crop(x, 3, torch.Generator().manual_seed(1))
    b = random_crop(x, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, random_crop(x, 3, torch.Generator().manual_seed(2)))
    shifted = sum(bool((a[i] != x[i]).any()) for i in range(64))
    assert shifted > 50  # only offset (3, 3) of 49 leaves an image in place


def test_hflip_flips_about_half():
    x = torch.rand(400, 3, 4, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(2)) for i in range(400)])
    kept = torch.tensor([torch.equal(out[i], x[i]) for i in range(400)])
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250


def test_augment_without_crop_or_flip_is_identity():
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(augment(x, crop_padding=0, hflip=False), x)


def test_cutmix_pastes_a_box_from_another_image():
    from kdbackdoor.data.augment import cutmix
    x = torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1).expand(16, 1, 8, 8).clone()  # image i is all i
    assert torch.equal(cutmix(x, 0.0, torch.Generator().manual_seed(0)), x)
    mixed = cutmix(x, 1.0, torch.Generator().manual_seed(0))
    again = cutmix(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again)
    for i in range(16):
        values = mixed[i].unique()
        assert len(values) <= 2  # itself and one partner at most
        foreign = mixed[i] != i
        if foreign.any():  # the pasted pixels form one rectangle
            rows, cols = foreign[0].any(1).nonzero().squeeze(1), foreign[0].any(0).nonzero().squeeze(1)
            assert foreign[0][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    changed = (mixed != x).flatten(1).any(1).float().mean()
    assert changed > 0.5  # with p = 1 most images get a box (a partner may be the image itself)
