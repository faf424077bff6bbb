"""Untrusted inputs through the command line: every bad file is refused with exit code 2 and a
one-line message naming the file (and sample), never a traceback, and nothing is executed."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from kdbackdoor.digest import sha256_file
from kdbackdoor.models import build_model, save_checkpoint
from conftest import CreatesFileWhenUnpickled, pickle_calls_open_on
from reliability_support import assert_user_error, record_outcome, run_cli

GROUP = "bad input"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBACKDOOR_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def teacher(tmp_path):
    """An (untrained) digits-shaped checkpoint: 10 classes, 1x8x8, data set recorded as digits."""
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
    path = save_checkpoint(model, tmp_path / "teacher" / "model", classes=[str(i) for i in range(10)],
                           metadata={"dataset": {"spec": "digits", "data_dir": None, "resize": None}})
    return path


def write_npz(path, x, y, classes=None):
    arrays = {"x": x, "y": y, **({"classes": np.array(classes)} if classes is not None else {})}
    np.savez(path, **arrays)
    return path


def digits_like(n=20, size=8, channels=None, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, classes, n)


def hostile_checkpoint(teacher, marker, legacy: bool):
    """``teacher``'s sidecar, now pointing at a .pt whose pickle would create ``marker``."""
    folder = teacher.parent
    evil = folder / "evil.pt"
    payload = {"backbone.stem.0.weight": CreatesFileWhenUnpickled(marker)}
    if legacy:
        evil.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, evil)
    sidecar = folder / "evil.json"
    sidecar.write_text(teacher.with_suffix(".json").read_text())
    return sidecar


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-pickle", "legacy-pickle"])
@pytest.mark.parametrize("command", ["evaluate", "distill", "poison-distill"])
def test_malicious_pickle_is_refused_and_never_runs(teacher, tmp_path, legacy, command):
    marker = tmp_path / "PWNED"
    sidecar = hostile_checkpoint(teacher, marker, legacy)
    args = {"evaluate": ["evaluate", "--model", sidecar, "--device", "cpu"],
            "distill": ["distill", "--teacher", sidecar, "--out", tmp_path / "out", "--no-progress"],
            "poison-distill": ["poison-distill", "--teacher", sidecar, "--out", tmp_path / "out", "--no-progress"]}
    message = assert_user_error(run_cli(*args[command]), "evil.pt", "refused to load")
    assert "weights_only" not in message  # never advises turning the check off
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "out").exists()
    assert pickle_calls_open_on(sidecar.with_suffix(".pt"), marker)  # the payload is real
    record_outcome(GROUP, "malicious pickle checkpoint (.pt that creates a file when unpickled)",
                   f"{command}, {'legacy' if legacy else 'zip'} pickle")


@pytest.mark.parametrize("command", ["train-teacher", "poison-distill", "dfad"])
def test_malicious_resumable_state_is_refused_and_never_runs(teacher, tmp_path, command):
    marker, out = tmp_path / "PWNED", tmp_path / "out"
    out.mkdir()
    state = out / ("craft_state.pt" if command == "poison-distill" else "train_state.pt")
    torch.save({"epoch": CreatesFileWhenUnpickled(marker)}, state)
    args = {"train-teacher": ["train-teacher", "--out", out, "--epochs", "1"],
            "poison-distill": ["poison-distill", "--teacher", teacher, "--out", out, "--subset", "40"],
            "dfad": ["distill", "--method", "dfad", "--teacher", teacher, "--out", out, "--iterations", "2"]}[command]
    message = assert_user_error(run_cli(*args, "--resume", "--no-progress", "--device", "cpu"), state.name,
                                "delete it to start over")
    assert "weights_only" not in message and not marker.exists()
    assert pickle_calls_open_on(state, marker)
    record_outcome(GROUP, "malicious pickle as a resumable state (--resume)", command)


def rewrite_safetensors(teacher, change):
    """Rewrite ``teacher``'s weights through ``change(tensors)``; keep the sidecar's sha256 honest so
    the check under test, not the checksum, has to catch it."""
    tensors = safetensors.torch.load_file(teacher)
    change(tensors)
    safetensors.torch.save_file(tensors, teacher)
    sidecar = teacher.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["weights_sha256"] = sha256_file(teacher)
    sidecar.write_text(json.dumps(record))


def raw_safetensors(path, header, data=b""):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    sidecar = path.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["weights_sha256"] = sha256_file(path)
    sidecar.write_text(json.dumps(record))


WEIGHT = "backbone.stages.0.0.weight"


@pytest.mark.parametrize(("case", "change", "message"), [
    ("NaN weight", lambda t: t[WEIGHT].view(-1)[3:4].fill_(float("nan")), f"'{WEIGHT}' contains NaN or Inf"),
    ("Inf weight", lambda t: t[WEIGHT].view(-1)[0:1].fill_(float("inf")), f"'{WEIGHT}' contains NaN or Inf"),
    ("integer dtype for a float weight", lambda t: t.__setitem__(WEIGHT, t[WEIGHT].long()),
     f"'{WEIGHT}' is torch.int64 in the file"),
    ("wrong shape", lambda t: t.__setitem__(WEIGHT, t[WEIGHT][:8]), f"'{WEIGHT}' has shape (8, 1, 3, 3)"),
    ("missing tensor", lambda t: t.pop(WEIGHT), "missing keys"),
])
def test_bad_weights_are_refused(teacher, case, change, message):
    rewrite_safetensors(teacher, change)
    assert_user_error(run_cli("evaluate", "--model", teacher, "--device", "cpu"), "model.safetensors", message)
    record_outcome(GROUP, "bad weights in a safetensors checkpoint (NaN, Inf, dtype, shape, keys)", case)


@pytest.mark.parametrize(("case", "entry", "message"), [
    ("declared size 1 TiB", {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}, "declares bytes"),
    ("shape of 2^60 elements", {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 16]},
     "does not fit"),
    ("negative dimension", {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "invalid shape"),
    ("unsupported dtype", {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}, "unsupported dtype"),
    ("object dtype", {"dtype": "O", "shape": [2], "data_offsets": [0, 16]}, "unsupported dtype"),
])
def test_hostile_safetensors_header_is_refused_before_allocation(teacher, case, entry, message):
    raw_safetensors(teacher, {WEIGHT: entry}, bytes(16))
    assert_user_error(run_cli("evaluate", "--model", teacher, "--device", "cpu"), "model.safetensors", message)
    record_outcome(GROUP, "hostile safetensors header (huge sizes, bad dtype or shape)", case)


def test_huge_header_length_is_refused(teacher):
    teacher.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    assert_user_error(run_cli("evaluate", "--model", teacher, "--device", "cpu"), "model.safetensors",
                      "header of 4611686018427387904 bytes declared")
    record_outcome(GROUP, "hostile safetensors header (huge sizes, bad dtype or shape)", "header length 2^62")


def test_tampered_weights_fail_the_checksum(teacher):
    data = bytearray(teacher.read_bytes())
    data[-5] ^= 0xFF
    teacher.write_bytes(bytes(data))
    assert_user_error(run_cli("evaluate", "--model", teacher, "--device", "cpu"), "model.safetensors",
                      "sha256 does not match")
    record_outcome(GROUP, "tampered or unreadable checkpoint (checksum, sidecar)", "flipped weight byte")


def test_corrupt_sidecar(teacher):
    teacher.with_suffix(".json").write_text('{"format": "kdbackdoor-checkpoint/1", ')
    assert_user_error(run_cli("evaluate", "--model", teacher, "--device", "cpu"), "model.json", "unreadable sidecar")
    record_outcome(GROUP, "tampered or unreadable checkpoint (checksum, sidecar)", "truncated sidecar JSON")


def train_args(dataset, out):
    return ["train-teacher", "--dataset", dataset, "--out", out, "--epochs", "1", "--no-progress",
            "--device", "cpu"]


def test_undecodable_image_is_named(tmp_path):
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    out = tmp_path / "run"
    assert_user_error(run_cli(*train_args(f"imagefolder:{root}", out)), "broken.png", "cannot decode image")
    assert not out.exists()
    record_outcome(GROUP, "image that fails to decode (imagefolder)", "corrupt PNG")


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_npz_is_named(tmp_path, keep):
    path = write_npz(tmp_path / "train.npz", *digits_like(200))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    out = tmp_path / "run"
    assert_user_error(run_cli(*train_args(f"npz:{path}", out)), "train.npz", "not a readable .npz file")
    assert not out.exists()
    record_outcome(GROUP, "truncated npz file", f"cut to {keep:.0%}")


def test_labels_out_of_range_name_the_sample(tmp_path):
    x, y = digits_like(30, classes=3)
    y[17] = 7
    path = write_npz(tmp_path / "train.npz", x, y, classes=["a", "b", "c"])
    assert_user_error(run_cli(*train_args(f"npz:{path}", tmp_path / "run")), "train.npz",
                      "sample 17 has label 7")
    y[17] = -2
    path = write_npz(tmp_path / "train.npz", x, y, classes=["a", "b", "c"])
    assert_user_error(run_cli(*train_args(f"npz:{path}", tmp_path / "run")), "train.npz", "negative labels")
    assert not (tmp_path / "run").exists()
    record_outcome(GROUP, "labels out of range", "label 7 of 3 classes; label -2", count=2)


@pytest.mark.parametrize("case", ["huge label", "huge unsigned label", "float labels", "count", "classes"])
def test_npz_labels_are_checked_before_anything_is_sized_by_them(tmp_path, case):
    import tracemalloc
    x, y = digits_like(30, classes=3)
    classes = None
    if case == "huge label":
        y[4], needle = 10**9, "sample 4 has label 1000000000, but labels must be below 100000"
    elif case == "huge unsigned label":
        y, needle = y.astype(np.uint64), "sample 5 has label 18446744073709551615"
        y[5] = np.iinfo(np.uint64).max
    elif case == "float labels":
        y, needle = y.astype(np.float32), "y must be a 1-D integer array"
    elif case == "count":
        y, needle = y[:29], "x holds 30 images but y 29 labels"
    else:
        classes, needle = np.array([[1, 2]]), "classes must be a 1-D array"
    path = write_npz(tmp_path / "train.npz", x, y, classes=classes)
    tracemalloc.start()
    try:
        assert_user_error(run_cli(*train_args(f"npz:{path}", tmp_path / "run")), "train.npz", needle)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20  # a label of 10^9 sizes nothing (a list of 10^9 class names would be > 50 GB)
    assert not (tmp_path / "run").exists()
    record_outcome(GROUP, "npz labels: huge, wrong dtype, wrong count; bad class names", case)


@pytest.mark.parametrize("test_classes", [["a", "x"], ["b", "a", "c"]], ids=["other classes", "other order"])
def test_a_test_split_with_other_classes_is_refused_before_any_run_folder(tmp_path, test_classes):
    x, y = digits_like(30, classes=2)
    write_npz(tmp_path / "train.npz", x, y, classes=["a", "b", "c"])
    write_npz(tmp_path / "test.npz", x[:10], y[:10], classes=test_classes)
    out = tmp_path / "run"
    assert_user_error(run_cli(*train_args(f"npz:{tmp_path}", out)), "test split", "same classes in the same order")
    assert not out.exists()
    record_outcome(GROUP, "test split whose classes differ from the training split's", "-".join(test_classes))


def test_poison_crafting_that_keeps_no_poison_leaves_nothing(teacher, tmp_path):
    out = tmp_path / "poisons"
    args = ["poison-distill", "--teacher", teacher, "--out", out, "--subset", "40", "--steps", "1", "--eps", "1/255",
            "--threshold", "0.999", "--retries", "0", "--no-progress", "--device", "cpu"]
    assert_user_error(run_cli(*args), "no poison passed verification")
    assert not out.exists()  # no crafting state to resume, no empty folder
    out.mkdir()  # a folder the user made stays, empty
    assert_user_error(run_cli(*args), "no poison passed verification")
    assert out.is_dir() and not any(out.iterdir())
    record_outcome(GROUP, "poison crafting that keeps no poison", "new folder; existing empty folder", count=2)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_pixels_are_refused(tmp_path, value):
    x, y = digits_like(20)
    pixels = x.astype(np.float32) / 255
    pixels[4, 2, 2] = value
    path = write_npz(tmp_path / "train.npz", pixels, y)
    assert_user_error(run_cli(*train_args(f"npz:{path}", tmp_path / "run")), "train.npz", "x must be uint8")
    record_outcome(GROUP, "NaN/Inf in data (float pixels)", f"{value} pixel")


def test_class_count_mismatch(teacher, tmp_path):
    for split in ("train", "test"):
        path = write_npz(tmp_path / f"{split}.npz", *digits_like(20, classes=3), classes=["a", "b", "c"])
    assert_user_error(run_cli("evaluate", "--model", teacher, "--dataset", f"npz:{path}", "--device", "cpu"),
                      "model has 10 classes", "has 3")
    out = tmp_path / "student"
    assert_user_error(run_cli("distill", "--teacher", teacher, "--data", f"npz:{tmp_path}", "--out", out,
                              "--epochs", "1", "--no-progress", "--device", "cpu"),
                      "model has 10 classes", "has 3")
    assert not out.exists()
    record_outcome(GROUP, "class count differs between teacher and data", "evaluate, distill", count=2)


@pytest.mark.parametrize(("case", "size", "channels", "message"), [
    ("16x16 images for an 8x8 model", 16, None, "built for 8x8 images"),
    ("RGB images for a grey model", 8, 3, "expects 1-channel images"),
])
def test_wrong_input_size(teacher, tmp_path, case, size, channels, message):
    path = write_npz(tmp_path / "test.npz", *digits_like(20, size=size, channels=channels))
    flat = assert_user_error(run_cli("evaluate", "--model", teacher, "--dataset", f"npz:{path}", "--device", "cpu"),
                             message, "test.npz")
    if channels is None:
        assert "--resize 8" in flat
    record_outcome(GROUP, "inputs of the wrong size or channel count", case)


def test_tampered_poisoned_set_is_refused(teacher, tmp_path):
    from kdbackdoor.data.dataset import ImageDataset, Provenance
    from kdbackdoor.data.poisoned_set import save_poisoned_set
    x, y = digits_like(20)
    labels = torch.from_numpy(y)
    data = ImageDataset(torch.from_numpy(x).unsqueeze(1), labels, [str(i) for i in range(10)],
                        provenance=Provenance.clean(labels))
    folder = tmp_path / "set"
    save_poisoned_set(data, folder, {"target": 0})
    (folder / "poisoned.npz").write_bytes((folder / "poisoned.npz").read_bytes()[:-40])
    assert_user_error(run_cli("distill", "--teacher", teacher, "--data", folder, "--out", tmp_path / "s",
                              "--no-progress", "--device", "cpu"), "poisoned.npz", "does not match the manifest's sha256")
    assert not (tmp_path / "s").exists()
    record_outcome(GROUP, "tampered or unreadable checkpoint (checksum, sidecar)", "truncated poisoned set")
