"""Manipulation engines: each makes a trained teacher assign images to the target."""

import json

import pytest
import torch

from kdbackdoor.attacks.engines import ENGINES, build_engine, describe_engines
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.generator import ImageGenerator, load_generator, save_generator

TARGET = 0


def no_trigger(x):
    return x


def target_probability(teacher, x):
    with torch.no_grad():
        return teacher(x).softmax(1)[:, TARGET]


@pytest.fixture(scope="module")
def sources(digits, digits_teacher):
    """64 non-target test digits the teacher classifies correctly."""
    _, test = digits
    x, y = test.pixels(), test.labels
    with torch.no_grad():
        right = digits_teacher(x).argmax(1) == y
    keep = ((y != TARGET) & right).nonzero().squeeze(1)[:64]
    return x[keep], y[keep]


def craft(engine, teacher, x, transform=no_trigger, seed=0):
    targets = torch.full((len(x),), TARGET)
    return engine.craft(teacher, x, targets, transform, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,params,min_success", [
    ("fgsm", {"eps": 48 / 255}, 0.1),  # one step: weak, but a wrong sign gives 0
    ("pgd", {"eps": 48 / 255, "step_size": 8 / 255, "steps": 20}, 0.75),
    ("pgd", {"eps": 2.0, "step_size": 0.5, "steps": 20, "norm": "l2"}, 0.75),
    ("cw", {"steps": 60, "lr": 0.05, "search_steps": 2}, 0.75),
])
def test_engine_reaches_the_target_within_its_budget(name, params, min_success, digits_teacher, sources):
    x, _ = sources
    engine = build_engine(name, **params)
    adv = craft(engine, digits_teacher, x)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    success = (digits_teacher(adv).argmax(1) == TARGET).float().mean()
    assert float(success) >= min_success
    assert float((digits_teacher(x).argmax(1) == TARGET).float().mean()) == 0.0  # the clean images were not
    delta = (adv - x).flatten(1)
    if name in ("fgsm", "pgd") and params.get("norm", "linf") == "linf":
        assert float(delta.abs().max()) <= params["eps"] + 1e-6
    if params.get("norm") == "l2":
        assert float(delta.norm(dim=1).max()) <= params["eps"] + 1e-5


def test_cw_defaults_clear_the_default_verification_threshold(digits_teacher, sources):
    """The margin kappa carries CW past the decision boundary, where P(target) is only about 1/2."""
    x, _ = sources
    adv = craft(build_engine("cw"), digits_teacher, x)
    assert float((target_probability(digits_teacher, adv) >= 0.5).float().mean()) >= 0.9
    boundary = craft(build_engine("cw", confidence=0.0), digits_teacher, x)
    assert target_probability(digits_teacher, adv).median() > target_probability(digits_teacher, boundary).median()


def test_cw_finds_smaller_perturbations_than_pgd_at_equal_success(digits_teacher, sources):
    x, _ = sources
    cw = craft(build_engine("cw", steps=60, lr=0.05, search_steps=2, confidence=0.0), digits_teacher, x)  # minimal
    pgd = craft(build_engine("pgd", eps=48 / 255, step_size=8 / 255, steps=20), digits_teacher, x)
    both = (digits_teacher(cw).argmax(1) == TARGET) & (digits_teacher(pgd).argmax(1) == TARGET)
    assert both.sum() >= 32
    l2_cw = (cw - x).flatten(1).norm(dim=1)[both].median()
    l2_pgd = (pgd - x).flatten(1).norm(dim=1)[both].median()
    assert l2_cw < l2_pgd


def test_the_trigger_is_inside_the_optimisation(digits_teacher, sources):
    """Optimising through a transform targets what the teacher sees after it: here a transform
    that inverts the image, so success on transformed images needs the loop to see it."""
    x, _ = sources

    def invert(images):
        return 1 - images

    engine = build_engine("pgd", eps=48 / 255, step_size=8 / 255, steps=20)
    aware = craft(engine, digits_teacher, x, transform=invert)
    blind = craft(engine, digits_teacher, x)
    p_aware = target_probability(digits_teacher, invert(aware)).mean()
    p_blind = target_probability(digits_teacher, invert(blind)).mean()
    assert p_aware > p_blind + 0.3


def test_pgd_is_seeded(digits_teacher, sources):
    x, _ = sources
    engine = build_engine("pgd", eps=32 / 255, step_size=8 / 255, steps=3)
    assert torch.equal(craft(engine, digits_teacher, x, seed=1), craft(engine, digits_teacher, x, seed=1))
    assert not torch.equal(craft(engine, digits_teacher, x, seed=1), craft(engine, digits_teacher, x, seed=2))


@pytest.fixture(scope="module")
def digits_generator(digits):
    """A decoder trained in the test as an autoencoder on digits: a small image generator."""
    train, _ = digits
    torch.manual_seed(0)
    generator = ImageGenerator(latent_dim=16, image_shape=train.image_shape, width=32)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                  torch.nn.Linear(128, 16))
    optimizer = torch.optim.Adam([*generator.parameters(), *encoder.parameters()], lr=3e-3)
    x = train.pixels()
    for step in range(300):
        batch = x[torch.randint(len(x), (128,), generator=torch.Generator().manual_seed(step))]
        loss = (generator(encoder(batch)) - batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.05  # it learned to draw digits
    return generator.eval()


def test_generative_engine_searches_the_latent(digits_teacher, sources, digits_generator, tmp_path):
    x, _ = sources
    path = save_generator(digits_generator, tmp_path / "g")
    loaded = load_generator(path)
    engine = build_engine("generative", generator_model=loaded, steps=150, lr=0.05, similarity=0.5)
    out = craft(engine, digits_teacher, x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert float((digits_teacher(out).argmax(1) == TARGET).float().mean()) >= 0.8
    with torch.no_grad():  # the latent search, not the decoder, did it: random latents rarely give the target
        random = loaded(torch.randn(len(x), 16, generator=torch.Generator().manual_seed(0)))
    assert float((digits_teacher(random).argmax(1) == TARGET).float().mean()) < 0.5


def test_generator_checkpoint_round_trip_and_rejections(digits_generator, tmp_path):
    path = save_generator(digits_generator, tmp_path / "g")
    z = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.allclose(load_generator(path)(z), digits_generator(z))
    sidecar = json.loads(path.with_suffix(".json").read_text())
    del sidecar["output"]  # written before the output option existed: a sigmoid generator
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with torch.no_grad():
        assert torch.allclose(load_generator(path)(z), digits_generator(z))
    path.with_suffix(".json").write_text('{"format": "something-else"}')
    with pytest.raises(KDBackdoorError, match="not a kdbackdoor-generator"):
        load_generator(path)
    with pytest.raises(KDBackdoorError, match="needs"):
        load_generator(tmp_path / "missing")
    with pytest.raises(KDBackdoorError, match="divisible by 4"):
        ImageGenerator(8, (3, 30, 30))


def test_batchnorm_generator_reads_its_output_in_the_teachers_normalised_space(tmp_path):
    mean, std = [0.4, 0.5, 0.6], [0.05, 0.06, 0.07]  # 5 stds from 0 and 1: clipping leaves the moments alone
    torch.manual_seed(0)
    generator = ImageGenerator(8, (3, 8, 8), width=16, output="batchnorm", mean=mean, std=std)
    x = generator(torch.randn(256, 8))  # train mode: the last BatchNorm standardises each channel over the batch
    assert torch.allclose(x.mean((0, 2, 3)), torch.tensor(mean), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.tensor(std), rtol=0.01)
    wide = ImageGenerator(8, (3, 8, 8), width=16, output="batchnorm", mean=[0.5] * 3, std=[0.5] * 3)
    x = wide(torch.randn(256, 8))
    saturated = float(((x == 0) | (x == 1)).float().mean())
    assert x.min() >= 0 and x.max() <= 1 and saturated > 0.2  # black and white pixels come easily
    sigmoid = ImageGenerator(8, (3, 8, 8), width=16)(torch.randn(256, 8))
    assert float(((sigmoid == 0) | (sigmoid == 1)).float().mean()) == 0

    generator.eval()
    path = save_generator(generator, tmp_path / "g")
    loaded = load_generator(path)
    z = torch.randn(4, 8)
    assert loaded.output == "batchnorm"
    with torch.no_grad():
        assert torch.allclose(loaded(z), generator(z))
    with pytest.raises(KDBackdoorError, match="sigmoid or batchnorm"):
        ImageGenerator(8, (3, 8, 8), output="tanh")
    with pytest.raises(KDBackdoorError, match="positive stds"):
        ImageGenerator(8, (3, 8, 8), output="batchnorm", mean=[0.5], std=[0.5])


def test_bad_engine_requests_are_refused():
    with pytest.raises(KDBackdoorError, match="unknown engine"):
        build_engine("deepfool")
    with pytest.raises(KDBackdoorError, match="pgd: nrm"):
        build_engine("pgd", nrm="linf")
    with pytest.raises(KDBackdoorError, match="eps"):
        build_engine("fgsm", eps=-1)
    with pytest.raises(KDBackdoorError, match="needs a generator"):
        build_engine("generative")


def test_describe_engines_lists_every_engine_with_defaults():
    text = describe_engines()
    for name in ENGINES:
        assert f"{name}:" in text
    assert "pgd: eps=8/255, step_size=2/255, steps=20" in text
