"""Architectures, the Classifier wrapper, the registry and feature capture."""

import pytest
import torch
import torch.nn as nn

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models import Classifier, available_architectures, build_model
from kdbackdoor.models.classifier import conv_layers
from kdbackdoor.models.features import capture, forward_with_features
from kdbackdoor.models.layers import HalvingMaxPool

ARCHS = [
    "wrn-16-1", "wrn-16-2", "wrn-40-1", "wrn-40-2", "resnet18", "resnet34",
    "vgg11-bn", "vgg16-bn", "small-cnn", "fast-cnn", "fast-cnn-half",
]
IMAGENET_ARCHS = [  # tested in test_foreign_models.py
    "resnet18-imagenet", "resnet34-imagenet", "resnet50-imagenet", "vgg11-bn-imagenet", "vgg16-bn-imagenet",
    "mobilenet-v2",
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(arch: str, **kwargs) -> Classifier:
    """The model with shapes only (no memory, no init cost): enough to count parameters."""
    with torch.device("meta"):
        return build_model(arch, 10, **kwargs)


def test_registry_lists_every_architecture():
    assert available_architectures() == sorted(ARCHS + IMAGENET_ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape_rgb32(arch):
    model = build_model(arch, 10).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert isinstance(model, Classifier) and model.arch == arch and model.num_classes == 10
    assert model.in_channels == 3 and model.input_size == (32, 32)


@pytest.mark.parametrize(("arch", "shape"), [
    ("wrn-16-1", (2, 3, 24, 40)), ("fast-cnn-half", (2, 3, 8, 40)),
    ("vgg11-bn", (2, 3, 12, 9)), ("small-cnn", (2, 3, 64, 64)),
])
def test_non_square_and_large_inputs(arch, shape):
    model = build_model(arch, 5, input_size=shape[2:]).eval()
    with torch.no_grad():
        assert model(torch.rand(shape)).shape == (2, 5)


@pytest.mark.parametrize(("arch", "expected"), [
    # Reference values of the standard CIFAR implementations, 10 classes, 3x32x32.
    ("wrn-16-1", 0.175e6), ("wrn-16-2", 0.692e6), ("wrn-40-1", 0.564e6), ("wrn-40-2", 2.244e6),
    ("resnet18", 11.17e6), ("resnet34", 21.28e6),
])
def test_parameter_counts(arch, expected):
    assert n_params(meta_model(arch)) == pytest.approx(expected, rel=0.01)


def test_small_models_are_small():
    assert 1_000 <= n_params(meta_model("small-cnn", in_channels=1)) <= 100_000
    assert n_params(meta_model("fast-cnn-half")) < n_params(meta_model("fast-cnn")) / 3


def test_unknown_architecture_lists_known_names():
    with pytest.raises(KDBackdoorError, match="unknown architecture 'wrn-99'.*small-cnn"):
        build_model("wrn-99", 10)


@pytest.mark.parametrize("kwargs", [
    {"num_classes": 0}, {"in_channels": 0}, {"input_size": (4, 32)},
    {"mean": [0.5, 0.5]}, {"std": [0.5, 0.0, 0.5]},
])
def test_build_rejects_bad_arguments(kwargs):
    with pytest.raises(KDBackdoorError):
        build_model("small-cnn", **{"num_classes": 10, **kwargs})


def test_forward_normalises_pixels_inside_the_model():
    model = build_model("small-cnn", 3, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0]).eval()
    assert model.mean.shape == (1, 3, 1, 1) and model.std.shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 8, 8)
    expected = model.backbone((x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1))
                              / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1))
    torch.testing.assert_close(model(x), expected)


def test_default_normalisation_is_half():
    model = build_model("small-cnn", 3, in_channels=2)
    assert model.mean.flatten().tolist() == [0.5, 0.5] and model.std.flatten().tolist() == [0.5, 0.5]


def test_wrong_channel_count_is_a_clear_error():
    model = build_model("small-cnn", 10, in_channels=3)
    with pytest.raises(KDBackdoorError, match=r"small-cnn expects .*\(N, 3, H, W\), got \(2, 1, 8, 8\)"):
        model(torch.rand(2, 1, 8, 8))


def test_init_is_deterministic_under_a_seed():
    def weights(seed):
        torch.manual_seed(seed)
        return build_model("wrn-16-1", 10).state_dict()

    first, again, other = weights(1), weights(1), weights(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["backbone.stem.weight"], other["backbone.stem.weight"])


def test_init_is_kaiming_with_zero_bias():
    torch.manual_seed(0)
    model = build_model("small-cnn", 10)
    conv = model.backbone.stages[1][0][0]  # 16 -> 32 channels, fan_out = 32 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.05)
    assert torch.count_nonzero(model.backbone.fc.bias) == 0


def test_wrn_stage_and_feature_shapes():
    model = build_model("wrn-16-2", 10).eval()
    assert model.stage_names == ["backbone.stages.0", "backbone.stages.1", "backbone.stages.2"]
    logits, feats = forward_with_features(
        model, torch.rand(2, 3, 32, 32), [*model.stage_names, model.feature_name]
    )
    shapes = [tuple(feats[name].shape) for name in model.stage_names]
    assert shapes == [(2, 32, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8)]
    assert feats[model.feature_name].shape == (2, 128)
    torch.testing.assert_close(logits, model.backbone.fc(feats[model.feature_name]))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_runs_on_gray8_and_exposes_its_structure(arch):
    model = build_model(arch, 7, in_channels=1, input_size=(8, 8)).eval()
    convs = conv_layers(model)
    ran: list[str] = []
    for name, conv in convs:
        conv.register_forward_hook(lambda *_, name=name: ran.append(name))
    names = [*model.stage_names, model.feature_name]
    with torch.no_grad():
        logits, feats = forward_with_features(model, torch.rand(2, 1, 8, 8), names)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert model.in_channels == 1 and model.input_size == (8, 8)
    assert len(model.stage_names) >= 3
    assert all(feats[name].dim() == 4 and feats[name].shape[0] == 2 for name in model.stage_names)
    assert feats[model.feature_name].shape == (2, model.backbone.fc.in_features)
    scale = 1 / 9 if arch.startswith("fast-cnn") else 1.0
    torch.testing.assert_close(logits, model.backbone.fc(feats[model.feature_name]) * scale)
    assert [name for name, _ in convs] == ran  # conv_layers lists convolutions in forward order
    assert all(isinstance(conv, nn.Conv2d) for _, conv in convs)


def test_capture_keeps_gradients_and_removes_its_hooks():
    model = build_model("small-cnn", 10)
    module = model.get_submodule("backbone.stages.1")
    with capture(model, ["backbone.stages.1"]) as feats:
        model(torch.rand(2, 3, 8, 8))
        assert len(module._forward_hooks) == 1
    assert feats["backbone.stages.1"].requires_grad
    assert len(module._forward_hooks) == 0
    before = feats["backbone.stages.1"]
    model(torch.rand(2, 3, 8, 8))
    assert feats["backbone.stages.1"] is before


def test_capture_rejects_unknown_names_and_lists_valid_ones():
    model = build_model("small-cnn", 10)
    with pytest.raises(KDBackdoorError, match=r"unknown module name\(s\) \['nope'\].*backbone\.pool"):
        with capture(model, ["backbone.pool", "nope"]):
            pass
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_halving_max_pool_keeps_one_pixel_sides():
    pool = HalvingMaxPool()
    x = torch.arange(8.0).view(1, 1, 1, 8)
    assert pool(x).flatten().tolist() == [1.0, 3.0, 5.0, 7.0]
    assert pool(torch.rand(1, 2, 1, 1)).shape == (1, 2, 1, 1)
    assert pool(torch.rand(1, 2, 5, 4)).shape == (1, 2, 2, 2)
