"""Tests for the trigger library: the common contract of every trigger, each trigger's
pixels, spec parsing, image-file triggers, and reproduction of ABD's trigger files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.triggers import (
    available_triggers,
    build_trigger,
    describe_syntax,
    parse_spec,
    render_trigger_grid,
)
from kdbackdoor.triggers.resize import resize

ABD_DIR = Path(__file__).resolve().parents[2] / "shared" / "triggers" / "abd-trap-and-replace"

PROCEDURAL = [name for name in available_triggers() if name != "image"]
SEEDLESS = {"badnets-square", "badnets-grid", "clean-label", "sig"}
# Image-file triggers, on files the `files` fixture writes ({d} is its folder).
IMAGE_SPECS = [
    "image:{d}/patch_rgba.png",
    "image:{d}/pattern.png?mode=blend",
    "image:{d}/pattern.png?mode=add&resize=nearest",
    "image:{d}/pattern.png?mode=add-renormalize",
    "image:{d}/pattern.png?mode=mask&mask={d}/mask.npy",
]
ALL_SPECS = PROCEDURAL + IMAGE_SPECS
SHAPES = [(1, 8, 8), (3, 32, 32), (3, 40, 56)]


def images(shape: tuple[int, int, int], n: int = 4, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    # torch.testing.assert_close imports torch.distributed on first use: seconds we skip.
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= atol


def grey(shape: tuple[int, int, int], value: float, n: int = 2) -> torch.Tensor:
    return torch.full((n, *shape), value)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trigger_files")
    rng = np.random.default_rng(0)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[4:8, 10:14, :3] = rng.integers(0, 256, (4, 4, 3))
    rgba[4:8, 10:14, 3] = 255
    rgba[20, 20] = (200, 100, 50, 128)  # one half-transparent pixel
    Image.fromarray(rgba, "RGBA").save(folder / "patch_rgba.png")
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / "pattern.png")
    mask = np.zeros((20, 20), np.float32)
    mask[2:5, 3:9] = 1
    np.save(folder / "mask.npy", mask)
    Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "mask.png")
    return folder


def make(spec: str, shape: tuple[int, int, int], files: Path, seed: int = 0):
    return build_trigger(spec.format(d=files), image_shape=shape, seed=seed)


# --- the contract every trigger keeps ------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_output_in_range_input_untouched_and_only_changed_mask_changes(spec, shape, files):
    trigger = make(spec, shape, files)
    x = images(shape)
    before = x.clone()
    out = trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, before)
    assert not torch.equal(out, x)
    mask = trigger.changed_mask()
    if mask is not None:
        assert mask.shape == shape[1:] and mask.dtype == torch.bool
        assert 0 < mask.sum() < mask.numel()
        assert torch.equal(out[..., ~mask], x[..., ~mask])
        assert not torch.equal(out[..., mask], x[..., mask])


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_keeps_float64_and_applies_same_pattern_to_each_image(spec, files):
    trigger = make(spec, (3, 32, 32), files)
    x = images((3, 32, 32), dtype=torch.float64)
    out = trigger(x)
    assert out.dtype == torch.float64
    for i in range(len(x)):  # batch-independence: one image alone gives the same result
        assert_close(trigger(x[i : i + 1])[0], out[i])


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_seed_determines_the_pattern(spec, files):
    x = images((3, 32, 32))
    first, again = make(spec, (3, 32, 32), files, seed=1), make(spec, (3, 32, 32), files, seed=1)
    assert torch.equal(first(x), again(x))
    other = make(spec, (3, 32, 32), files, seed=2)
    random = spec in PROCEDURAL and spec not in SEEDLESS
    assert torch.equal(first(x), other(x)) != random


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_config_round_trip_through_json(spec, files):
    shape = (3, 40, 56)
    trigger = make(spec, shape, files, seed=7)
    config = json.loads(json.dumps(trigger.config()))
    assert config["name"] == trigger.name and config["seed"] == 7
    assert config["image_shape"] == list(shape)
    rebuilt = build_trigger(config)
    assert rebuilt.config() == trigger.config()
    x = images(shape)
    assert torch.equal(rebuilt(x), trigger(x))


FULL_IMAGE = ["blend", "l2-inv", "sig", "smooth", "wanet"]


@pytest.mark.parametrize("name", FULL_IMAGE)
def test_full_image_triggers_have_no_mask(name):
    assert build_trigger(name, (3, 32, 32)).changed_mask() is None


# --- what each trigger does -----------------------------------------------------------------


def test_badnets_square_matches_abd_definition():
    x = images((3, 32, 32))
    expected = x.clone()
    expected[:, :, 32 - 1 - 4 : 32 - 1, 32 - 1 - 4 : 32 - 1] = 1.0  # ABD's badnet_sq
    trigger = build_trigger("badnets-square", (3, 32, 32))
    assert torch.equal(trigger(x), expected)
    assert torch.equal(trigger.changed_mask(), (expected != x).any(0).any(0))


def test_badnets_grid_matches_abd_definition():
    x = images((3, 32, 32))
    expected = x.clone()
    # ABD sets, at 32 px: [31,31]=255 [31,30]=0 [31,29]=255 [30,31]=0 [30,30]=255 [30,29]=0
    # [29,31]=255 [29,30]=0 [29,29]=0.
    for (row, col), value in {
        (31, 31): 1, (31, 30): 0, (31, 29): 1, (30, 31): 0, (30, 30): 1, (30, 29): 0,
        (29, 31): 1, (29, 30): 0, (29, 29): 0,
    }.items():
        expected[:, :, row, col] = value
    assert torch.equal(build_trigger("badnets-grid", (3, 32, 32))(x), expected)


def test_clean_label_puts_abd_grid_in_four_corners():
    x = images((1, 32, 32))
    out = build_trigger("clean-label", (1, 32, 32))(x)
    grid = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    for rows in (slice(0, 3), slice(29, 32)):
        for cols in (slice(0, 3), slice(29, 32)):
            assert torch.equal(out[:, 0, rows, cols], grid.expand(4, 3, 3))
    assert torch.equal(out[:, :, 3:29], x[:, :, 3:29])


@pytest.mark.parametrize(
    "shape, spec, rows, cols",
    [
        ((1, 8, 8), "badnets-square", (7, 8), (7, 8)),  # 4 px -> 1 px, offset 1 -> 0 px
        ((3, 224, 224), "badnets-square", (189, 217), (189, 217)),  # 28 px, 7 px from corner
        ((3, 40, 56), "badnets-square", (34, 39), (47, 54)),  # 5x7 px, offset 1x2 px
        ((3, 32, 32), "badnets-square:size=3,corner=top-left,offset=0", (0, 3), (0, 3)),
        ((3, 32, 32), "badnets-square:corner=top-right,offset=2", (2, 6), (26, 30)),
        ((3, 224, 224), "badnets-grid", (203, 224), (203, 224)),  # 7-px cells
        ((3, 32, 32), "trojan-3x3", (25, 28), (25, 28)),  # where ABD's trojan_3x3 sits
        ((3, 32, 32), "trojan-8x8:corner=bottom-left", (22, 30), (2, 10)),
    ],
)
def test_patch_size_and_position_scale_with_resolution(shape, spec, rows, cols):
    expected = torch.zeros(shape[1:], dtype=torch.bool)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert torch.equal(build_trigger(spec, shape).changed_mask(), expected)


def test_badnets_grid_scales_its_cells():
    out = build_trigger("badnets-grid", (1, 224, 224))(grey((1, 224, 224), 0.5))
    corner = out[0, 0, 203:, 203:]
    assert torch.equal(corner[::7, ::7], torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]]))
    assert torch.equal(corner, corner[::7, ::7].repeat_interleave(7, 0).repeat_interleave(7, 1))


@pytest.mark.parametrize("name", ["trojan-3x3", "trojan-8x8", "trojan-wm", "l2-inv", "sig"])
def test_additive_triggers_add_a_fixed_pattern_and_clip(name):
    shape = (3, 32, 32)
    trigger = build_trigger(name, shape)
    # For a pattern p in [-1, 1]: on black clip(p) = max(p, 0), on white min(p, 0) + 1.
    pattern = trigger(grey(shape, 0.0))[0] + trigger(grey(shape, 1.0))[0] - 1
    x = images(shape)
    assert_close(trigger(x), (x + pattern).clamp(0, 1))


def test_sig_is_a_horizontal_sinusoid():
    out = build_trigger("sig:amplitude=0.1,frequency=4", (3, 16, 24))(grey((3, 16, 24), 0.5))
    expected = 0.5 + 0.1 * torch.sin(2 * math.pi * 4 * torch.arange(24) / 24)
    assert_close(out, expected.expand_as(out))


def test_sig_default_amplitude_is_40_levels():
    out = build_trigger("sig", (1, 32, 32))(grey((1, 32, 32), 0.5))
    assert abs((out - 0.5).abs().max().item() - 40 / 255) < 1e-3


def test_blend_is_alpha_mix_with_uniform_noise():
    shape = (3, 32, 32)
    trigger = build_trigger("blend", shape)
    noise = trigger(torch.zeros(1, *shape))[0] / 0.2
    x = images(shape)
    assert_close(trigger(x), 0.8 * x + 0.2 * noise)
    assert 0.45 < noise.mean() < 0.55 and noise.min() >= 0 and noise.max() <= 1


def test_l2_inv_noise_has_requested_rms():
    out = build_trigger("l2-inv:rms=0.03", (3, 32, 32))(grey((3, 32, 32), 0.5))
    assert abs((out - 0.5).square().mean().sqrt().item() - 0.03) < 1e-5


@pytest.mark.parametrize("shape, count", [((3, 32, 32), 9), ((1, 8, 8), 1), ((3, 40, 56), 20)])
def test_l0_inv_replaces_a_few_pixels_by_black_or_white(shape, count):
    trigger = build_trigger("l0-inv", shape)
    mask = trigger.changed_mask()
    assert mask.sum() == count
    out = trigger(images(shape))
    assert set(out[..., mask].unique().tolist()) <= {0.0, 1.0}


def test_trojan_wm_is_a_ring_around_the_centre():
    mask = build_trigger("trojan-wm", (3, 32, 32)).changed_mask()
    assert not mask[14:18, 14:18].any()  # hollow centre
    assert mask[16, 6] and mask[6, 16]  # on the ring, 10 px from the centre
    assert not mask[0, 0]


def test_smooth_renormalises_each_image():
    shape = (3, 32, 32)
    trigger = build_trigger("smooth", shape)
    x = 0.3 + 0.4 * images(shape)
    out = trigger(x)
    assert torch.allclose(out.amin(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6)
    assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(4), atol=1e-6)
    # On constant images only the pattern remains, rescaled to [0, 1].
    assert_close(trigger(grey(shape, 0.2)), trigger(grey(shape, 0.9)))


def test_wanet_warps_without_changing_colours():
    shape = (3, 32, 32)
    x = images(shape)
    # float32 grid_sample rounds coordinates, hence the tolerance.
    assert_close(build_trigger("wanet:s=0", shape)(x), x, atol=1e-5)
    warp = build_trigger("wanet", shape)
    assert_close(warp(grey(shape, 0.3)), grey(shape, 0.3), atol=1e-5)
    smooth_image = torch.linspace(0, 1, 32).expand(1, 3, 32, 32)
    moved = (warp(smooth_image) - smooth_image).abs()
    assert 0 < moved.max() < 2 / 32  # sub-pixel to one-pixel displacements


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("nope", "badnets-square"),  # lists what is available
        ("badnets-square:sise=3", "sise"),
        ("badnets-square:sise=3", "size"),
        ("badnets-square:size=abc", "size='abc'"),
        ("badnets-square:size=0", "size"),
        ("badnets-square:corner=middle", "top-left"),
        ("badnets-square:size", "not key=value"),
        ("badnets-square:size=3,size=4", "twice"),
        ("blend:alpha=2", "alpha"),
        ("wanet:k=0", "k"),
        ("badnets-square:size=40", "does not fit"),
        ("trojan-8x8:offset=30", "does not fit"),
        ("trojan-wm:radius=0.5", "covers no pixel"),
        ("image:", "image:PATH"),
        ("image:{d}/missing.png", "missing.png"),
        ("image:{d}/mask.npy", "not an image"),
        ("image:{d}/pattern.png?mode=wrong", "add-renormalize"),
        ("image:{d}/pattern.png?mode=add&alpha=0.3", "mode=blend only"),
        ("image:{d}/pattern.png?mode=mask", "mode=mask needs mask=FILE"),
        ("image:{d}/pattern.png?mode", "not key=value"),
        ("image:{d}/pattern.png?path=x.png", "twice"),
        ("image:{d}/pattern.png?mode=patch&sha256=00", "changed"),
    ],
)
def test_bad_specs_raise_clear_errors(spec, fragment, files):
    with pytest.raises(KDBackdoorError) as error:
        make(spec, (3, 32, 32), files)
    assert fragment.format(d=files) in str(error.value)
    assert "\n" not in str(error.value)


def test_grids_that_overlap_are_refused():
    with pytest.raises(KDBackdoorError, match="overlap"):
        build_trigger("clean-label:cell=6", (1, 8, 8))


def test_bad_mask_files_are_refused(files, tmp_path):
    np.save(tmp_path / "big.npy", np.full((4, 4), 2.0))
    np.save(tmp_path / "cube.npy", np.ones((2, 4, 4)))
    for name, fragment in (("big.npy", "[0, 1]"), ("cube.npy", "shape")):
        with pytest.raises(KDBackdoorError, match=fragment.replace("[", r"\[")):
            build_trigger(f"image:{files}/pattern.png?mode=mask&mask={tmp_path / name}", (3, 32, 32))


@pytest.mark.parametrize(
    "batch",
    [torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 30), torch.rand(3, 32, 32),
     torch.zeros(2, 3, 32, 32, dtype=torch.uint8)],
    ids=["channels", "width", "no-batch-dim", "uint8"],
)
def test_batches_of_another_shape_or_dtype_are_refused(batch):
    with pytest.raises(KDBackdoorError, match="badnets-square"):
        build_trigger("badnets-square", (3, 32, 32))(batch)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: build_trigger("blend"), "image shape"),
        (lambda: build_trigger("blend", (0, 32, 32)), "image_shape"),
        (lambda: build_trigger("blend", (3, 32)), "image_shape"),
        (lambda: build_trigger("blend", (3, 32, 32), seed="a"), "seed"),
        (lambda: build_trigger(42), "int"),
        (lambda: build_trigger({"name": "blend", "image_shape": [3, 32, 32], "colour": 1}), "colour"),
        (lambda: build_trigger({"name": "blend"}), "image_shape"),
        (lambda: build_trigger(build_trigger("blend", (3, 32, 32)).config(), (3, 16, 16)), "not"),
        (lambda: build_trigger({"name": "blend", "image_shape": [3, 8, 8], "params": {"a": 1}}), "'a'"),
    ],
)
def test_bad_build_arguments_raise_clear_errors(call, fragment):
    with pytest.raises(KDBackdoorError, match=fragment):
        call()


def test_numpy_integers_are_accepted_and_stored_as_plain_ints():
    trigger = build_trigger("blend", tuple(np.array([3, 8, 8])), seed=np.int64(5))
    assert trigger.image_shape == (3, 8, 8) and trigger.seed == 5
    assert json.loads(json.dumps(trigger.config()))["seed"] == 5


def test_config_of_a_changed_file_is_refused(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(path)
    config = build_trigger(f"image:{path}?mode=add", (1, 8, 8)).config()
    assert config["params"]["sha256"] and Path(config["params"]["path"]).is_absolute()
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path)
    with pytest.raises(KDBackdoorError, match="changed"):
        build_trigger(config)


# --- image-file triggers ------------------------------------------------------------------------


def test_image_patch_pastes_through_alpha(files):
    trigger = build_trigger(f"image:{files}/patch_rgba.png", (3, 32, 32))
    rgba = torch.from_numpy(np.array(Image.open(files / "patch_rgba.png"))).permute(2, 0, 1) / 255
    mask = trigger.changed_mask()
    expected_mask = torch.zeros(32, 32, dtype=torch.bool)
    expected_mask[4:8, 10:14] = expected_mask[20, 20] = True
    assert torch.equal(mask, expected_mask)
    x = images((3, 32, 32))
    out = trigger(x)
    assert_close(out[:, :, 4:8, 10:14], rgba[:3, 4:8, 10:14].expand(4, -1, -1, -1))
    half = 128 / 255
    assert_close(out[:, :, 20, 20], x[:, :, 20, 20] * (1 - half) + rgba[:3, 20, 20] * half)


def test_image_patch_without_alpha_pastes_non_zero_pixels(tmp_path):
    pattern = np.zeros((16, 16, 3), np.uint8)
    pattern[3:6, 3:6] = (255, 0, 128)
    pattern[10, 12] = (0, 0, 1)
    Image.fromarray(pattern).save(tmp_path / "p.png")
    trigger = build_trigger(f"image:{tmp_path}/p.png", (3, 16, 16))
    assert trigger.changed_mask().sum() == 10
    out = trigger(images((3, 16, 16)))
    assert_close(out[0, :, 4, 4], torch.tensor([1.0, 0.0, 128 / 255]))


def test_image_mask_from_npy_or_png_is_the_same(files):
    base = f"image:{files}/pattern.png?mode=mask&mask={files}/mask"
    from_npy, from_png = build_trigger(base + ".npy", (3, 20, 20)), build_trigger(base + ".png", (3, 20, 20))
    x = images((3, 20, 20))
    assert torch.equal(from_npy(x), from_png(x))
    assert from_npy.changed_mask().sum() == 3 * 6


def test_grey_image_applies_to_every_channel_and_colour_image_turns_grey(tmp_path, files):
    Image.fromarray(np.full((8, 8), 51, np.uint8)).save(tmp_path / "g.png")
    out = build_trigger(f"image:{tmp_path}/g.png?mode=add", (3, 8, 8))(torch.zeros(1, 3, 8, 8))
    assert_close(out, torch.full_like(out, 0.2))
    luma = np.array(Image.open(files / "pattern.png").convert("L"), dtype=np.float64) / 255
    trigger = build_trigger(f"image:{files}/pattern.png?mode=add", (1, 48, 40))
    np.testing.assert_allclose(trigger(torch.zeros(1, 1, 48, 40))[0, 0].numpy(), luma, atol=1e-6)


def test_colour_image_on_two_channel_data_is_refused(files):
    with pytest.raises(KDBackdoorError, match="2-channel"):
        build_trigger(f"image:{files}/pattern.png?mode=add", (2, 32, 32))


def reference_axis_weights(length: int, target: int) -> np.ndarray:
    """(target, length) weights of scikit-image's resize(order=1, anti_aliasing=True) along one
    axis: when shrinking by f, a Gaussian blur (sigma = (f - 1)/2, radius int(4 sigma + 0.5),
    mirrored edges), then linear interpolation at source coordinate (i + 0.5)·f - 0.5."""
    factor = length / target
    source = np.clip((np.arange(target) + 0.5) * factor - 0.5, 0, length - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, length - 1)
    weights = np.zeros((target, length))
    np.add.at(weights, (np.arange(target), low), 1 - (source - low))
    np.add.at(weights, (np.arange(target), high), source - low)
    if factor <= 1:
        return weights
    sigma = (factor - 1) / 2
    radius = int(4 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    blur = np.zeros((length, length))
    for shift, tap in zip(range(-radius, radius + 1), taps / taps.sum()):
        neighbour = np.abs(np.arange(length) + shift)
        neighbour = np.where(neighbour > length - 1, 2 * (length - 1) - neighbour, neighbour)
        np.add.at(blur, (np.arange(length), neighbour), tap)
    return weights @ blur


def reference_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (h, w, K) floats to ``size`` = (H, W) as scikit-image does (see above)."""
    rows = reference_axis_weights(image.shape[0], size[0])
    cols = reference_axis_weights(image.shape[1], size[1])
    return (rows @ image.transpose(2, 0, 1) @ cols.T).transpose(1, 2, 0)


@pytest.mark.parametrize("size", [(32, 32), (16, 9), (60, 50)])
def test_antialiased_resize_follows_scikit_image_definition(size):
    picture = np.random.default_rng(1).random((48, 40, 3))
    ours = resize(torch.from_numpy(picture).permute(2, 0, 1), size, "antialias").permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, reference_resize(picture, size), atol=1e-9)


def test_image_files_are_resized_to_the_data(files):
    out = build_trigger(f"image:{files}/pattern.png?mode=blend&alpha=1", (3, 24, 30))(images((3, 24, 30)))
    picture = np.array(Image.open(files / "pattern.png"), dtype=np.float64) / 255
    expected = np.rint(reference_resize(picture, (24, 30)) * 255) / 255
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


# --- ABD's trigger files ------------------------------------------------------------------------


def abd_reference(pattern_name: str, rule: str, images_uint8: np.ndarray) -> np.ndarray:
    """ABD's poisoning of uint8 (N, 32, 32, 3) images with one of its trigger files, in numpy:
    read the file, resize to 32x32 (anti-aliased) and round to uint8 if needed, compute in
    float on 0..255, clip and truncate to uint8."""
    trigger = np.array(Image.open(ABD_DIR / pattern_name))
    if trigger.ndim == 2:
        trigger = trigger[:, :, None]
    if trigger.shape[:2] != (32, 32):
        trigger = np.rint(reference_resize(trigger / 255, (32, 32)) * 255)
    trigger = trigger.astype(np.float64)
    x = images_uint8.astype(np.float64)
    if rule == "blend":
        out = 0.8 * x + 0.2 * trigger
    elif rule == "add":
        out = x + trigger
    elif rule == "mask":
        keep = 1 - np.transpose(np.load(ABD_DIR / "mask.npy"), (1, 2, 0))
        out = x * keep + trigger
    else:  # add then renormalise each image to [0, 255]
        out = x + trigger
        low = out.min(axis=(1, 2, 3), keepdims=True)
        out = (out - low) / (out.max(axis=(1, 2, 3), keepdims=True) - low) * 255
    return np.clip(out, 0, 255).astype(np.uint8)


ABD_CASES = [
    ("blend.png", "blend", "mode=blend&alpha=0.2"),
    ("sig.png", "blend", "mode=blend&alpha=0.2"),
    ("trojan_wm.png", "add", "mode=add"),
    ("trojan_3x3.png", "add", "mode=add"),
    ("trojan_8x8.png", "add", "mode=add"),
    ("l2_inv.png", "add", "mode=add"),
    ("l0_inv.png", "mask", "mode=mask&mask={d}/mask.npy"),
    ("smooth_cifar10.png", "renormalize", "mode=add-renormalize"),
    ("smooth_gtsrb.png", "renormalize", "mode=add-renormalize"),
]


@pytest.mark.shared_data
@pytest.mark.parametrize("pattern_name, rule, options", ABD_CASES)
def test_abd_trigger_files_are_reproduced(pattern_name, rule, options):
    if not ABD_DIR.is_dir():
        pytest.skip(f"{ABD_DIR} is absent")
    rng = np.random.default_rng(3)
    # Images with various ranges, so that renormalisation has work to do.
    low = rng.integers(0, 100, (16, 1, 1, 1))
    high = rng.integers(150, 256, (16, 1, 1, 1))
    batch = (low + rng.random((16, 32, 32, 3)) * (high - low)).astype(np.uint8)
    expected = abd_reference(pattern_name, rule, batch)
    spec = f"image:{ABD_DIR / pattern_name}?{options.format(d=ABD_DIR)}"
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).double() / 255
    ours = build_trigger(spec, (3, 32, 32))(x).permute(0, 2, 3, 1).numpy() * 255
    # ABD truncates to uint8 at the end; we keep the exact value, less than a level above.
    difference = ours - expected
    assert difference.min() > -1e-6 and difference.max() < 1 + 1e-6
    assert np.array_equal(np.floor(ours + 1e-6).astype(np.uint8), expected)


# --- help, description, picture, devices -------------------------------------------------------


def test_parse_spec_splits_name_path_and_options():
    assert parse_spec("badnets-square:size=3, corner=top-left") == (
        "badnets-square", {"size": "3", "corner": "top-left"})
    assert parse_spec("image:a/b:c.png?mode=blend&alpha=0.1") == (
        "image", {"path": "a/b:c.png", "mode": "blend", "alpha": "0.1"})
    assert parse_spec("wanet") == ("wanet", {})


def test_syntax_help_and_description_name_everything():
    text = describe_syntax()
    assert all(name in text for name in available_triggers())
    assert "image:PATH?key=value&" in text and "size=4 corner=bottom-right offset=1" in text
    assert build_trigger("badnets-square:size=3", (1, 8, 8)).describe() == (
        "badnets-square(size=3, corner=bottom-right, offset=1) for 1x8x8 images, seed 0")


@pytest.mark.parametrize("shape, n, mode", [((1, 8, 8), 5, "L"), ((3, 32, 32), 10, "RGB")])
def test_render_trigger_grid_writes_three_rows(tmp_path, shape, n, mode):
    trigger = build_trigger("badnets-square", shape)
    path = render_trigger_grid(trigger, images(shape, n=n), tmp_path / "grid.png")
    picture = Image.open(path)
    scale = 64 // shape[2]  # enlarged to 64 px
    shown = min(n, 8)
    assert picture.mode == mode
    assert picture.size == (shown * (64 + 2) + 2, 3 * (64 + 2) + 2)
    pixels = np.array(picture).reshape(picture.size[1], picture.size[0], -1)
    difference_row = pixels[2 + 2 * 66 : 2 + 2 * 66 + 64, 2 : 2 + 64]
    mask = trigger.changed_mask().numpy().repeat(scale, 0).repeat(scale, 1)
    assert difference_row[mask].min() > 0 and difference_row[~mask].max() == 0
    assert not list(tmp_path.glob(".grid.png.*"))  # no temporary file left behind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_cuda_results_match_cpu(spec, files):
    trigger = make(spec, (3, 32, 32), files)
    x = images((3, 32, 32))
    out = trigger(x.cuda())
    assert out.is_cuda
    assert_close(out.cpu(), trigger(x), atol=1e-5)
