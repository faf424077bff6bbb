"""Checkpoint save/load: round trips and every rejection of a bad or hostile file."""

import datetime
import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models import build_model, load_checkpoint, save_checkpoint
from kdbackdoor.numerics import to_layout

from conftest import CreatesFileWhenUnpickled, pickle_calls_open_on

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = build_model("small-cnn", 10, mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1])
    net.train()
    net(torch.rand(4, 3, 8, 8))  # move the BN running statistics away from their init
    return net.eval()


@pytest.fixture
def saved(model, tmp_path):
    return save_checkpoint(model, tmp_path / "teacher", classes=CLASSES, metadata={"acc": 0.9})


def same_logits(a, b) -> bool:
    """Bit-identical logits once both models are in the numerics policy's memory layout (loading
    puts a model in it; channels-last convolutions round differently from contiguous ones)."""
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        return torch.equal(to_layout(a)(x), to_layout(b)(x))


def write_raw_safetensors(path, header: dict, data: bytes = b"") -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def test_round_trip_gives_the_same_model_and_a_complete_sidecar(model, saved, tmp_path):
    assert saved == tmp_path / "teacher.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.json", "teacher.safetensors"]
    loaded, sidecar = load_checkpoint(saved)
    assert same_logits(model, loaded) and not loaded.training
    assert sidecar == json.loads((tmp_path / "teacher.json").read_text())
    assert sidecar["format"] == "kdbackdoor-checkpoint/1"
    assert (sidecar["arch"], sidecar["num_classes"], sidecar["in_channels"]) == ("small-cnn", 10, 3)
    assert sidecar["input_size"] == [32, 32] and sidecar["classes"] == CLASSES
    assert sidecar["mean"] == pytest.approx([0.1, 0.2, 0.3])
    assert sidecar["std"] == pytest.approx([0.3, 0.2, 0.1])
    assert sidecar["weights_sha256"] == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert set(sidecar["versions"]) == {"kdbackdoor", "torch", "python"}
    created = datetime.datetime.fromisoformat(sidecar["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert sidecar["metadata"] == {"acc": 0.9}


def test_load_accepts_the_sidecar_or_the_folder(model, saved):
    for path in (saved.with_suffix(".json"), saved.parent):
        assert same_logits(model, load_checkpoint(path)[0])


def test_save_forces_the_safetensors_suffix(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "student.pt")
    assert path.name == "student.safetensors" and (tmp_path / "student.json").exists()
    assert json.loads((tmp_path / "student.json").read_text())["classes"] is None


def test_save_rejects_bad_classes_and_metadata(model, tmp_path):
    with pytest.raises(KDBackdoorError, match="3 class names given for a model with 10 classes"):
        save_checkpoint(model, tmp_path / "m", classes=["a", "b", "c"])
    with pytest.raises(KDBackdoorError, match="metadata is not JSON-serialisable"):
        save_checkpoint(model, tmp_path / "m", metadata={"config": object()})
    assert list(tmp_path.iterdir()) == []


def test_bare_weights_load_with_explicit_architecture(model, saved):
    saved.with_suffix(".json").unlink()
    loaded, info = load_checkpoint(saved, arch="small-cnn", num_classes=10)
    assert same_logits(model, loaded)
    assert info["arch"] == "small-cnn" and info["mean"] == pytest.approx([0.1, 0.2, 0.3])


def test_pt_state_dict_loads_weights_only(model, tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    loaded, info = load_checkpoint(path, arch="small-cnn", num_classes=10, device=torch.device("cpu"))
    assert same_logits(model, loaded)
    assert (info["num_classes"], info["classes"], info["metadata"]) == (10, None, {})
    with pytest.raises(KDBackdoorError, match="give the architecture and class count"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(KDBackdoorError, match="nothing.safetensors: no such file"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_unknown_extension(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(KDBackdoorError, match=r"weights.bin: unknown checkpoint extension '\.bin'"):
        load_checkpoint(tmp_path / "weights.bin")


def test_folder_must_hold_exactly_one_checkpoint(model, saved):
    torch.save(model.state_dict(), saved.parent / "other.pt")
    loaded, _ = load_checkpoint(saved.parent)  # a run folder's train_state.pt does not compete
    assert loaded.arch == model.arch
    save_checkpoint(model, saved.parent / "second.safetensors")
    with pytest.raises(KDBackdoorError, match="exactly one weights file.*second.safetensors, teacher.safetensors"):
        load_checkpoint(saved.parent)


def test_missing_sidecar(saved):
    saved.with_suffix(".json").unlink()
    with pytest.raises(KDBackdoorError, match="teacher.safetensors: no sidecar teacher.json"):
        load_checkpoint(saved)


def test_truncated_file(saved):
    saved.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(KDBackdoorError, match="teacher.safetensors: tensor .* declares bytes .*truncated"):
        load_checkpoint(saved)


@pytest.mark.parametrize("raw", [b"abc", struct.pack("<Q", 2**62) + b"{}", struct.pack("<Q", 3) + b"{x}"])
def test_corrupt_file(tmp_path, raw):
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw)
    with pytest.raises(KDBackdoorError, match="m.safetensors: (truncated|corrupt)"):
        load_checkpoint(path, arch="small-cnn", num_classes=10)


@pytest.mark.parametrize(("entry", "problem"), [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}, "declares bytes"),
    ({"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 16]}, "does not fit"),
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "invalid shape"),
    ({"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}, "unsupported dtype 'C64'"),
])
def test_hostile_header_is_refused_before_allocation(tmp_path, entry, problem):
    path = tmp_path / "m.safetensors"
    write_raw_safetensors(path, {"w": entry}, bytes(16))
    with pytest.raises(KDBackdoorError, match=f"m.safetensors: tensor 'w' .*{problem}"):
        load_checkpoint(path, arch="small-cnn", num_classes=10)


def test_shape_mismatch_names_the_key_and_both_shapes(saved):
    saved.with_suffix(".json").unlink()
    with pytest.raises(
        KDBackdoorError, match=r"'backbone.fc.weight' has shape \(10, 64\) in the file, \(5, 64\)"
    ):
        load_checkpoint(saved, arch="small-cnn", num_classes=5)


def test_missing_and_unexpected_keys(model, tmp_path):
    state = dict(model.state_dict())
    del state["backbone.fc.bias"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(
        KDBackdoorError, match=r"missing keys \['backbone.fc.bias'\], unexpected keys \['extra.weight'\]"
    ):
        load_checkpoint(path, arch="small-cnn", num_classes=10)


def test_class_count_differs_from_expected(saved):
    with pytest.raises(KDBackdoorError, match="teacher.json: checkpoint has num_classes=10, expected 100"):
        load_checkpoint(saved, num_classes=100)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(model, tmp_path, bad):
    with torch.no_grad():
        model.backbone.fc.weight[0, 0] = bad
    path = save_checkpoint(model, tmp_path / "m")
    with pytest.raises(KDBackdoorError, match="'backbone.fc.weight' contains NaN or Inf"):
        load_checkpoint(path)


def test_sha256_mismatch(saved):
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0xFF  # last byte of tensor data: the header stays valid
    saved.write_bytes(bytes(data))
    with pytest.raises(KDBackdoorError, match="sha256 does not match the one recorded in teacher.json"):
        load_checkpoint(saved)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"backbone.fc.weight": CreatesFileWhenUnpickled(marker)}, path)
    with pytest.raises(KDBackdoorError, match="evil.pt: refused to load"):
        load_checkpoint(path, arch="small-cnn", num_classes=10)
    assert not marker.exists()
    assert pickle_calls_open_on(path, marker)  # the payload is real


def test_pt_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(KDBackdoorError, match="m.pt: not a state dict"):
        load_checkpoint(path, arch="small-cnn", num_classes=10)
