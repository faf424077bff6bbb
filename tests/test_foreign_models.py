"""Foreign weights: upstream key names and shapes, the naming maps, and identical outputs after a
round trip through kdbackdoor's checkpoint format."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models import build_model, load_checkpoint, save_checkpoint
from kdbackdoor.models.registry import IMAGENET_MEAN, IMAGENET_STD

import upstream_models as up


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Parameter counts torchvision publishes for its models (1000 classes) pin the layouts.
@pytest.mark.parametrize("arch, count", [
    ("resnet18-imagenet", 11_689_512), ("resnet34-imagenet", 21_797_672), ("resnet50-imagenet", 25_557_032),
    ("vgg11-bn-imagenet", 132_868_840), ("vgg16-bn-imagenet", 138_365_992), ("mobilenet-v2", 3_504_872),
])
def test_imagenet_architectures_have_torchvisions_parameter_counts(arch, count):
    with torch.device("meta"):
        model = build_model(arch, 1000)
    assert parameter_count(model) == count
    assert model.input_size == (224, 224)


# Upstream keys and shapes, as torchvision, timm and the data-free KD code bases write them.
PINNED = {
    "resnet18": (up.tv_resnet18, {"conv1.weight": (64, 3, 7, 7), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                                  "layer4.1.bn2.running_var": (512,), "fc.weight": (1000, 512)}, 122),
    "resnet50": (up.tv_resnet50, {"layer1.0.conv3.weight": (256, 64, 1, 1), "layer3.5.bn3.bias": (1024,),
                                  "layer4.0.conv2.weight": (512, 512, 3, 3), "fc.weight": (1000, 2048)}, 320),
    "vgg11_bn": (lambda: up.TVVGG(up.VGG_CFGS["vgg11_bn"]), {"features.0.weight": (64, 3, 3, 3),
                 "features.25.weight": (512, 512, 3, 3), "features.26.running_mean": (512,),
                 "classifier.0.weight": (4096, 25088), "classifier.6.weight": (1000, 4096)}, 62),
    "mobilenet_v2": (up.TVMobileNetV2, {"features.0.0.weight": (32, 3, 3, 3), "features.1.conv.0.0.weight": (32, 1, 3, 3),
                     "features.3.conv.1.0.weight": (144, 1, 3, 3), "features.18.1.running_var": (1280,),
                     "classifier.1.weight": (1000, 1280)}, 314),
    "timm_mobilenetv2_100": (up.TimmMobileNetV2, {"conv_stem.weight": (32, 3, 3, 3), "blocks.0.0.conv_dw.weight": (32, 1, 3, 3),
                             "blocks.6.0.conv_pwl.weight": (320, 960, 1, 1), "conv_head.weight": (1280, 320, 1, 1),
                             "classifier.weight": (1000, 1280)}, 314),
    "wrn_16_2": (lambda: up.DFWideResNet(16, 2, 10), {"conv1.weight": (16, 3, 3, 3),
                 "block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "block3.layer.1.bn2.weight": (128,),
                 "bn1.running_mean": (128,), "fc.weight": (10, 128)}, 83),
    "cifar_resnet18": (lambda: up.CifarResNet([2, 2, 2, 2]), {"conv1.weight": (64, 3, 3, 3),
                       "layer3.0.shortcut.1.weight": (256,), "linear.weight": (10, 512)}, 122),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_upstream_definitions_use_the_upstream_keys_and_shapes(name):
    factory, pinned, count = PINNED[name]
    with torch.device("meta"):
        state = factory().state_dict()
    assert {k: tuple(state[k].shape) for k in pinned} == pinned
    assert len(state) == count


def save_state(model: torch.nn.Module, path, **wrap) -> None:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save({**wrap, "state_dict": state} if wrap else state, path)


# (upstream model, kdbackdoor arch, num_classes, side, file suffix, expected naming)
ROUND_TRIPS = {
    "torchvision resnet18": (lambda: up.tv_resnet18(7), "resnet18-imagenet", 7, 64, ".pth", "torchvision-resnet"),
    "torchvision resnet34": pytest.param((lambda: up.tv_resnet34(5), "resnet34-imagenet", 5, 64, ".safetensors",
                                          "torchvision-resnet"), marks=pytest.mark.slow),
    "torchvision resnet50": (lambda: up.tv_resnet50(5), "resnet50-imagenet", 5, 64, ".pt", "torchvision-resnet"),
    "torchvision mobilenet_v2": (lambda: up.TVMobileNetV2(6), "mobilenet-v2", 6, 64, ".pth", "torchvision-mobilenet-v2"),
    "timm mobilenetv2_100": (lambda: up.TimmMobileNetV2(6), "mobilenet-v2", 6, 64, ".safetensors", "timm-mobilenetv2"),
    "data-free wrn-16-1": (lambda: up.DFWideResNet(16, 1, 10), "wrn-16-1", 10, 32, ".pth", "datafree-wrn"),
    "data-free wrn-40-2": (lambda: up.DFWideResNet(40, 2, 100), "wrn-40-2", 100, 32, ".safetensors", "datafree-wrn"),
    "cifar resnet18": (lambda: up.CifarResNet([2, 2, 2, 2], 10), "resnet18", 10, 32, ".pth", "cifar-resnet"),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS.values()), ids=list(ROUND_TRIPS))
def test_foreign_weights_give_the_upstream_logits_before_and_after_a_round_trip(case, tmp_path):
    factory, arch, classes, side, suffix, naming = case
    reference = up.randomise(factory())
    source = tmp_path / f"upstream{suffix}"
    save_state(reference, source)
    model, config = load_checkpoint(source, arch=arch, num_classes=classes, input_size=(side, side))
    assert config["source"]["naming"] == naming
    x = torch.rand(3, 3, side, side)
    normalised = (x - model.mean) / model.std  # upstream models take normalised input
    with torch.no_grad():
        expected = reference(normalised)
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-4)
        reloaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "imported"))
        assert torch.equal(reloaded(x), model(x))


def test_sources_normalisation_and_size_are_the_defaults(tmp_path):
    save_state(up.randomise(up.tv_resnet18(10)), tmp_path / "tv.pth")
    model, config = load_checkpoint(tmp_path / "tv.pth", arch="resnet18-imagenet", num_classes=10)
    assert config["input_size"] == [224, 224] and config["source"]["normalisation"] == "architecture default"
    assert torch.allclose(model.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(model.std.flatten(), torch.tensor(IMAGENET_STD))
    save_state(up.randomise(up.DFWideResNet(16, 1, 100)), tmp_path / "wrn.pth")
    model, config = load_checkpoint(tmp_path / "wrn.pth", arch="wrn-16-1", num_classes=100)
    assert config["input_size"] == [32, 32] and config["source"]["normalisation"] == "datafree-wrn default"
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.5071, 0.4867, 0.4408]))  # CIFAR-100's
    model, config = load_checkpoint(tmp_path / "wrn.pth", arch="wrn-16-1", num_classes=100,
                                    mean=[0.5] * 3, std=[0.25] * 3, input_size=(64, 48))
    assert config["source"]["normalisation"] == "given" and config["input_size"] == [64, 48]
    assert model.std.flatten().tolist() == [0.25] * 3


def test_training_checkpoints_are_unwrapped_and_dataparallel_prefixes_stripped(tmp_path):
    reference = up.randomise(up.DFWideResNet(16, 1, 10))
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"epoch": 199, "best_acc1": 0.93, "state_dict": state, "optimizer": {"lr": 0.1}}, tmp_path / "ck.pth")
    _, config = load_checkpoint(tmp_path / "ck.pth", arch="wrn-16-1", num_classes=10)
    assert config["source"]["state_dict_key"] == "state_dict"
    assert config["source"]["stripped_prefix"] == "module."
    assert config["source"]["key_map"]["block2.layer.0.convShortcut.weight"] == "backbone.stages.1.0.shortcut.weight"


def test_older_torchvision_weights_without_batch_counters_load(tmp_path):
    state = {k: v for k, v in up.randomise(up.tv_resnet18(4)).state_dict().items() if "num_batches_tracked" not in k}
    safetensors.torch.save_file(state, tmp_path / "old.safetensors")
    model, _ = load_checkpoint(tmp_path / "old.safetensors", arch="resnet18-imagenet", num_classes=4)
    assert model.backbone.stem[1].num_batches_tracked.item() == 0


def test_a_mismatch_names_missing_and_unexpected_keys_and_the_architecture_that_fits(tmp_path):
    save_state(up.randomise(up.DFWideResNet(16, 2, 10)), tmp_path / "wrn.pth")
    with pytest.raises(KDBackdoorError) as error:
        load_checkpoint(tmp_path / "wrn.pth", arch="resnet18", num_classes=10)
    message = str(error.value)
    assert "weights do not match resnet18 in any naming it accepts (kdbackdoor, cifar-resnet)" in message
    assert "missing keys ['backbone.stages.0.0.conv1.weight'" in message
    assert "unexpected keys ['block1.layer.0.bn1.weight'" in message
    assert message.endswith("the file matches wrn-16-2 in datafree-wrn naming: pass arch wrn-16-2")
    assert "\n" not in message


def test_a_torchvision_resnet_given_as_the_cifar_resnet_is_pointed_at_the_imagenet_one(tmp_path):
    save_state(up.randomise(up.tv_resnet18(10)), tmp_path / "tv.pth")
    with pytest.raises(KDBackdoorError, match=r"'backbone.stem.0.weight' has shape \(64, 3, 7, 7\) in the file, "
                       r"\(64, 3, 3, 3\) .*pass arch resnet18-imagenet$"):
        load_checkpoint(tmp_path / "tv.pth", arch="resnet18", num_classes=10)


def test_a_wrong_class_count_is_named(tmp_path):
    save_state(up.randomise(up.tv_resnet18(10)), tmp_path / "tv.pth")
    with pytest.raises(KDBackdoorError, match="the file's classifier has 10 classes, not 1000"):
        load_checkpoint(tmp_path / "tv.pth", arch="resnet18-imagenet", num_classes=1000)


@pytest.mark.slow
@pytest.mark.parametrize("name, arch", [("vgg11_bn", "vgg11-bn-imagenet"), ("vgg16_bn", "vgg16-bn-imagenet")])
def test_torchvision_vgg_gives_the_upstream_logits(name, arch, tmp_path):
    reference = up.randomise(up.TVVGG(up.VGG_CFGS[name], 3))
    save_state(reference, tmp_path / "vgg.safetensors")
    model, config = load_checkpoint(tmp_path / "vgg.safetensors", arch=arch, num_classes=3, input_size=(32, 32))
    assert config["source"]["naming"] == "torchvision-vgg"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference((x - model.mean) / model.std), atol=1e-5, rtol=1e-4)


def test_a_hostile_pickle_is_refused_without_advice_to_unpickle_it(tmp_path):
    from conftest import CreatesFileWhenUnpickled

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"conv1.weight": CreatesFileWhenUnpickled(marker)}}, tmp_path / "evil.pth")
    with pytest.raises(KDBackdoorError) as error:
        load_checkpoint(tmp_path / "evil.pth", arch="wrn-16-1", num_classes=10)
    message = str(error.value)
    assert "refused to load" in message and "weights_only" not in message and "\n" not in message
    assert not marker.exists()


@pytest.fixture(scope="module")
def torchvision_resnet18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "resnet18.safetensors"
    save_state(up.randomise(up.tv_resnet18(3)), path)
    return path


@pytest.mark.parametrize("settings, problem", [
    (dict(input_size=(4, 4)), r"resnet18-imagenet cannot take a 4x4 input: it needs at least 8 px a side"),
    (dict(mean=[0.5, 0.5], std=[0.2, 0.2, 0.2]), r"mean needs 3 values \(one per channel\), got \[0.5, 0.5\]"),
    (dict(mean=[0.5] * 3), "give both mean and std, or neither"),
    (dict(mean=[0.5] * 3, std=[0.2, 0.0, 0.2]), "std must be positive"),
])
def test_impossible_settings_are_refused(torchvision_resnet18_file, settings, problem):
    with pytest.raises(KDBackdoorError, match=problem):
        load_checkpoint(torchvision_resnet18_file, arch="resnet18-imagenet", num_classes=3, **settings)


def test_an_input_size_below_the_architectures_minimum_is_refused():
    with pytest.raises(KDBackdoorError, match="vgg11-bn-imagenet cannot take a 16x16 input: it needs at least 32 px "
                                              r"a side \(five 2x2 max-pools\)"):
        build_model("vgg11-bn-imagenet", 3, input_size=(16, 16))


def test_import_writes_a_checkpoint_that_records_its_source(tmp_path):
    from kdbackdoor.digest import sha256_file
    from kdbackdoor.models.importing import import_model

    reference = up.randomise(up.DFWideResNet(16, 1, 10))
    save_state(reference, tmp_path / "wrn.pth", epoch=3)
    path, sidecar = import_model(tmp_path / "wrn.pth", tmp_path / "out", arch="wrn-16-1", num_classes=10)
    imported = sidecar["metadata"]["imported_from"]
    assert imported["sha256"] == sha256_file(tmp_path / "wrn.pth") and imported["naming"] == "datafree-wrn"
    assert imported["key_map"]["fc.weight"] == "backbone.fc.weight" and imported["state_dict_key"] == "state_dict"
    model, _ = load_checkpoint(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference((x - model.mean) / model.std), atol=1e-5, rtol=1e-4)
    with pytest.raises(KDBackdoorError, match="already holds a model"):
        import_model(tmp_path / "wrn.pth", tmp_path / "out", arch="wrn-16-1", num_classes=10)


def test_a_failed_import_leaves_nothing_behind(tmp_path):
    from kdbackdoor.models.importing import import_model

    save_state(up.randomise(up.DFWideResNet(16, 1, 10)), tmp_path / "wrn.pth")
    with pytest.raises(KDBackdoorError, match="classifier has 10 classes, not 100"):
        import_model(tmp_path / "wrn.pth", tmp_path / "out", arch="wrn-16-1", num_classes=100)
    assert not (tmp_path / "out").exists()
