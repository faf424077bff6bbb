"""Models in timm's hub layout: a local folder or ``hf:OWNER/REPO[@REVISION]`` on the Hugging Face Hub.

A timm-layout repository holds ``model.safetensors`` and a ``config.json`` naming the timm
``architecture``, ``num_classes`` and a ``pretrained_cfg`` with ``input_size`` ([C, H, W]),
``mean`` and ``std``. The timm architecture names that kdbackdoor builds are in
``TIMM_ARCHITECTURES``. Downloads go through ``huggingface_hub`` (the optional ``hub`` extra),
so its cache (``HF_HOME``, ``HF_HUB_CACHE``), token and offline mode (``HF_HUB_OFFLINE=1``)
apply as usual; nothing but those two files is fetched, and the weights are never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.classifier import Classifier
from kdbackdoor.models.foreign import load_bare_weights

HUB_PREFIX = "hf:"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TIMM_ARCHITECTURES = {
    "resnet18": "resnet18-imagenet",
    "resnet34": "resnet34-imagenet",
    "resnet50": "resnet50-imagenet",
    "mobilenetv2_100": "mobilenet-v2",
}
"""timm architecture name (before any ``.tag``) -> kdbackdoor architecture."""


def is_timm_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding config.json and model.safetensors."""
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """``hf:OWNER/REPO[@REVISION]`` -> (repo id, revision or None for the default branch)."""
    body = source[len(HUB_PREFIX):]
    repo_id, _, revision = body.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or (_ and not revision):
        raise KDBackdoorError(f"{source}: a hub model is named hf:OWNER/REPO or hf:OWNER/REPO@REVISION")
    return repo_id, revision or None


def fetch_hub(source: str) -> Path:
    """The local snapshot folder of a hub model (config.json and model.safetensors), downloaded
    into the Hugging Face cache unless already there or the hub is offline."""
    repo_id, revision = parse_hub_source(source)
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise KDBackdoorError(
            f"{source}: loading from the Hugging Face Hub needs huggingface_hub: pip install 'kdbackdoor[hub]'"
        ) from None
    at = f" at revision {revision}" if revision else ""
    if huggingface_hub.try_to_load_from_cache(repo_id, WEIGHTS_FILE, revision=revision) is huggingface_hub._CACHED_NO_EXIST:
        raise KDBackdoorError(f"{source}: the repository holds no {WEIGHTS_FILE}{at} (only safetensors weights are loaded)")
    paths = {}
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            paths[filename] = Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision))
        except errors.LocalEntryNotFoundError:
            raise KDBackdoorError(
                f"{source}: {filename}{at} is not in the Hugging Face cache and the hub cannot be reached "
                "(offline); fetch it once online or point HF_HUB_CACHE at a cache holding it"
            ) from None
        except errors.RevisionNotFoundError:
            raise KDBackdoorError(f"{source}: the repository has no revision {revision!r}") from None
        except errors.RepositoryNotFoundError:
            raise KDBackdoorError(f"{source}: no such repository (or it is private or gated: log in with a token)") from None
        except errors.RemoteEntryNotFoundError:
            raise KDBackdoorError(
                f"{source}: the repository holds no {filename}{at} (a timm-layout repository has {CONFIG_FILE} "
                f"and {WEIGHTS_FILE})"
            ) from None
        except (OSError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise KDBackdoorError(f"{source}: download failed ({reason})") from None
    if paths[CONFIG_FILE].parent != paths[WEIGHTS_FILE].parent:
        raise KDBackdoorError(f"{source}: {CONFIG_FILE} and {WEIGHTS_FILE} came from different snapshots")
    return paths[WEIGHTS_FILE].parent


def read_timm_config(folder: Path) -> dict[str, Any]:
    """The architecture, class count, channels, input size (H, W), mean, std and class names
    that ``folder/config.json`` declares, in kdbackdoor's terms."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KDBackdoorError(f"{path}: unreadable config ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise KDBackdoorError(f"{path}: not a timm config (no 'architecture')")
    timm_arch = config["architecture"].split(".")[0]
    if timm_arch not in TIMM_ARCHITECTURES:
        raise KDBackdoorError(
            f"{path}: timm architecture {config['architecture']!r} is not one kdbackdoor builds; "
            f"supported: {', '.join(TIMM_ARCHITECTURES)}"
        )
    pretrained = config.get("pretrained_cfg") or {}
    num_classes = config.get("num_classes", pretrained.get("num_classes"))
    size = pretrained.get("input_size")
    try:
        described = {
            "arch": TIMM_ARCHITECTURES[timm_arch],
            "num_classes": int(num_classes),
            "in_channels": int(size[0]) if size else None,
            "input_size": [int(size[1]), int(size[2])] if size else None,
            "mean": [float(v) for v in pretrained["mean"]] if "mean" in pretrained else None,
            "std": [float(v) for v in pretrained["std"]] if "std" in pretrained else None,
        }
    except (TypeError, ValueError, IndexError) as exc:
        raise KDBackdoorError(f"{path}: malformed num_classes or pretrained_cfg ({exc})") from None
    labels = config.get("label_names")
    described["classes"] = [str(v) for v in labels] if isinstance(labels, list) and len(labels) == described["num_classes"] else None
    return described


def load_timm(source: str, **given: Any) -> tuple[Classifier, list[str] | None, dict[str, Any]]:
    """A model (train mode, CPU) from a timm-layout folder or ``hf:`` source, its class names
    (config.json's ``label_names``) and a record of where it came from. ``given`` holds the
    caller's expectations (arch, num_classes, in_channels, input_size, mean, std; None = any);
    one that disagrees with config.json is an error."""
    folder = fetch_hub(source) if source.startswith(HUB_PREFIX) else Path(source)
    described = read_timm_config(folder)
    for key, value in given.items():
        if value is not None and described.get(key) is not None and described[key] != value:
            raise KDBackdoorError(f"{folder / CONFIG_FILE}: declares {key}={described[key]!r}, expected {value!r}")
    settings = {k: described[k] if described.get(k) is not None else given.get(k)
                for k in ("arch", "num_classes", "in_channels", "input_size", "mean", "std")}
    if settings["input_size"] is not None:
        settings["input_size"] = tuple(settings["input_size"])
    model, source_record = load_bare_weights(folder / WEIGHTS_FILE, **settings)
    source_record["config"] = str(folder / CONFIG_FILE)
    if source.startswith(HUB_PREFIX):
        repo_id, revision = parse_hub_source(source)
        source_record["hub"] = {"repo_id": repo_id, "revision": revision, "commit": folder.name}
    return model, described["classes"], source_record
