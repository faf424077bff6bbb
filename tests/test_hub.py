"""Models in timm's hub layout: a local folder, and ``hf:OWNER/REPO[@REVISION]`` through
huggingface_hub against a cache folder laid out as the hub lays it (no network: offline mode)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models import load_checkpoint

import upstream_models as up

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG = {
    "architecture": "resnet18", "num_classes": 4, "num_features": 512, "global_pool": "avg",
    "label_names": ["cat", "dog", "fox", "owl"],
    "pretrained_cfg": {"tag": "tiny_in4", "input_size": [3, 64, 64], "interpolation": "bicubic", "crop_pct": 0.95,
                       "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3], "num_classes": 4, "first_conv": "conv1",
                       "classifier": "fc"},
}


@pytest.fixture(scope="module")
def reference():
    return up.randomise(up.tv_resnet18(4))


def write_repo(folder, reference, config=CONFIG, weights=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        safetensors.torch.save_file({k: v.clone() for k, v in reference.state_dict().items()},
                                    folder / "model.safetensors")
    return folder


def assert_same_as(model, reference):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference((x - model.mean) / model.std), atol=1e-5, rtol=1e-4)


def test_a_timm_folder_loads_with_its_config(tmp_path, reference):
    folder = write_repo(tmp_path / "resnet18.tiny_in4", reference)
    model, config = load_checkpoint(folder)
    assert (config["arch"], config["num_classes"], config["input_size"]) == ("resnet18-imagenet", 4, [64, 64])
    assert config["classes"] == ["cat", "dog", "fox", "owl"]
    assert config["mean"] == pytest.approx([0.4, 0.45, 0.5]) and config["std"] == pytest.approx([0.2, 0.25, 0.3])
    assert config["source"]["naming"] == "torchvision-resnet"
    assert_same_as(model, reference)


def test_a_timm_folder_disagreeing_with_the_caller_is_refused(tmp_path, reference):
    folder = write_repo(tmp_path / "m", reference)
    with pytest.raises(KDBackdoorError, match=r"config.json: declares num_classes=4, expected 10"):
        load_checkpoint(folder, num_classes=10)


def test_an_unknown_timm_architecture_is_named(tmp_path, reference):
    folder = write_repo(tmp_path / "m", reference, {**CONFIG, "architecture": "vit_base_patch16_224"})
    with pytest.raises(KDBackdoorError, match="timm architecture 'vit_base_patch16_224' is not one kdbackdoor builds"):
        load_checkpoint(folder)


# --- the hub, offline, against a cache folder in the hub's layout -------------------------------
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline huggingface_hub whose cache is a fresh folder; returns that folder."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_repo(cache, repo_id, reference, *, weights=True, branch="main"):
    """Lay out ``repo_id`` in the hub cache as huggingface_hub does: refs/<branch> names a commit,
    snapshots/<commit>/ holds the files; a file known not to exist is marked under .no_exist/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(COMMIT)
    write_repo(repo / "snapshots" / COMMIT, reference, weights=weights)
    if not weights:
        (repo / ".no_exist" / COMMIT).mkdir(parents=True)
        (repo / ".no_exist" / COMMIT / "model.safetensors").touch()


def test_a_cached_hub_model_loads_offline_by_branch_or_commit(hub, reference):
    cache_repo(hub, "someone/tiny-resnet18", reference)
    for source in ("hf:someone/tiny-resnet18", f"hf:someone/tiny-resnet18@{COMMIT}"):
        model, config = load_checkpoint(source)
        assert config["source"]["hub"]["commit"] == COMMIT
        assert config["source"]["hub"]["repo_id"] == "someone/tiny-resnet18"
        assert_same_as(model, reference)


def one_line_error(source: str) -> str:
    with pytest.raises(KDBackdoorError) as error:
        load_checkpoint(source)
    message = str(error.value)
    assert "\n" not in message and message.startswith(source)
    return message


def test_offline_without_a_cached_copy(hub):
    assert "config.json is not in the Hugging Face cache and the hub cannot be reached (offline)" in one_line_error(
        "hf:someone/absent")


def test_offline_with_a_revision_the_cache_lacks(hub, reference):
    cache_repo(hub, "someone/tiny-resnet18", reference)
    assert "config.json at revision v2 is not in the Hugging Face cache" in one_line_error("hf:someone/tiny-resnet18@v2")


def test_a_repository_without_weights(hub, reference):
    cache_repo(hub, "someone/config-only", reference, weights=False)
    assert "the repository holds no model.safetensors" in one_line_error("hf:someone/config-only")


@pytest.mark.parametrize("error_name, problem", [
    ("RevisionNotFoundError", "the repository has no revision 'v9'"),
    ("RepositoryNotFoundError", "no such repository"),
    ("RemoteEntryNotFoundError", "the repository holds no config.json at revision v9"),
])
def test_hub_answers_become_one_line_errors(hub, monkeypatch, error_name, problem):
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://hub.invalid/x"))

    def refuse(*args, **kwargs):
        raise getattr(errors, error_name)(f"404 Client Error\nmore detail", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    assert problem in one_line_error("hf:someone/repo@v9")


@pytest.mark.parametrize("source", ["hf:norepo", "hf:a/b/c", "hf:owner/repo@"])
def test_malformed_hub_names(source):
    with pytest.raises(KDBackdoorError, match="a hub model is named hf:OWNER/REPO or hf:OWNER/REPO@REVISION"):
        load_checkpoint(source)
