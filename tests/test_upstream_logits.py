"""Logits of real torchvision and timm models against the same weights loaded through kdbackdoor.

Skipped where torchvision or timm do not import (they need a torch build of their own). Offline:
models are built with random weights (and random BatchNorm statistics), their state dicts
exported to .safetensors as a user would, loaded with kdbackdoor's foreign loader and compared.
Run: ``python -m pytest tests/test_upstream_logits.py -q``.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from kdbackdoor.models import load_checkpoint

from upstream_models import randomise

CLASSES = 10
TORCHVISION = {"resnet18": "resnet18-imagenet", "resnet34": "resnet34-imagenet", "resnet50": "resnet50-imagenet",
               "vgg11_bn": "vgg11-bn-imagenet", "vgg16_bn": "vgg16-bn-imagenet", "mobilenet_v2": "mobilenet-v2"}
TIMM = {"resnet18": "resnet18-imagenet", "resnet34": "resnet34-imagenet", "resnet50": "resnet50-imagenet",
        "mobilenetv2_100": "mobilenet-v2"}


def export(model: torch.nn.Module, path) -> None:
    safetensors.torch.save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)


def same_logits(upstream: torch.nn.Module, ours: torch.nn.Module, side: int) -> None:
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
    with torch.no_grad():
        expected = upstream((x - ours.mean) / ours.std)
        got = ours(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_weights_give_torchvisions_logits(name, tmp_path):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    upstream = randomise(getattr(models, name)(weights=None, num_classes=CLASSES))
    export(upstream, tmp_path / f"{name}.safetensors")
    ours, config = load_checkpoint(tmp_path / f"{name}.safetensors", arch=TORCHVISION[name], num_classes=CLASSES)
    assert config["source"]["naming"].startswith("torchvision")
    for side in (224, 64):
        same_logits(upstream, ours, side)


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_weights_give_timms_logits(name, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    upstream = randomise(timm.create_model(name, pretrained=False, num_classes=CLASSES))
    export(upstream, tmp_path / f"{name}.safetensors")
    ours, _ = load_checkpoint(tmp_path / f"{name}.safetensors", arch=TIMM[name], num_classes=CLASSES)
    for side in (224, 64):
        same_logits(upstream, ours, side)


@pytest.mark.parametrize("name", list(TIMM))
def test_a_folder_timm_writes_for_the_hub_loads_as_it_is(name, tmp_path):
    timm = pytest.importorskip("timm")
    hub = pytest.importorskip("timm.models._hub")
    torch.manual_seed(0)
    upstream = randomise(timm.create_model(name, pretrained=False, num_classes=CLASSES))
    hub.save_for_hf(upstream, tmp_path / name, safe_serialization=True)  # config.json + model.safetensors
    ours, config = load_checkpoint(tmp_path / name)
    assert (config["arch"], config["num_classes"]) == (TIMM[name], CLASSES)
    expected = upstream.pretrained_cfg
    assert config["mean"] == pytest.approx(list(expected["mean"]))
    assert config["input_size"] == list(expected["input_size"][1:])
    same_logits(upstream, ours, 224)
