"""Data-set sources: digits, npz, imagefolder (with the decode cache), GTSRB, and the real data."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdbackdoor.data import imagefolder
from kdbackdoor.data.sources import available_datasets, load_dataset
from kdbackdoor.errors import KDBackdoorError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _load(spec: str, split: str = "train", **kwargs):
    return load_dataset(spec, split, progress=False, **kwargs)


# --- spec and argument checks -------------------------------------------------------------------

def test_available_datasets_lists_every_source():
    assert available_datasets() == [
        "cifar10", "cifar100", "digits", "gtsrb", "imagefolder:PATH", "npz:PATH"]


@pytest.mark.parametrize("spec, split, kwargs, message", [
    ("mnist", "train", {}, "available: cifar10, cifar100, digits"),
    ("digits", "val", {}, "split must be one of train, test"),
    ("imagefolder", "train", {}, "imagefolder:PATH"),
    ("digits:somewhere", "train", {}, "write it as digits"),
    ("digits", "train", {"resize": 0}, "resize must be"),
    ("digits", "train", {"resize": (8, 8, 8)}, "resize must be"),
])
def test_bad_requests_are_refused(spec, split, kwargs, message):
    with pytest.raises(KDBackdoorError, match=message):
        _load(spec, split, **kwargs)


# --- digits -------------------------------------------------------------------------------------

def test_digits_splits_are_stratified_complete_and_deterministic():
    train, test = _load("digits", "train"), _load("digits", "test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.image_shape == (1, 8, 8) and train.images.dtype == torch.uint8
    assert train.classes == [str(i) for i in range(10)]
    assert train.name == "digits:train" and test.meta == {"source": "digits", "split": "test"}
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    per_class = torch.bincount(train.labels, minlength=10) + torch.bincount(test.labels, minlength=10)
    from sklearn.datasets import load_digits
    assert per_class.tolist() == np.bincount(load_digits().target).tolist()
    share = torch.bincount(test.labels, minlength=10) / per_class
    assert share.min() > 0.19 and share.max() < 0.21
    again = _load("digits", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_resize_applies_to_array_sources():
    small = _load("digits", "test")
    big = _load("digits", "test", resize=16)
    assert big.image_shape == (1, 16, 16)
    # Upsampling keeps the mean brightness of each image.
    assert torch.allclose(big.pixels().mean((1, 2, 3)), small.pixels().mean((1, 2, 3)), atol=0.02)


# --- npz ----------------------------------------------------------------------------------------

def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_reads_colour_grayscale_classes_and_split_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    colour = _load(f"npz:{_write_npz(tmp_path / 'train.npz', x=x, y=np.array([0, 2, 1, 2, 0]))}")
    assert colour.image_shape == (3, 4, 6) and colour.classes == ["0", "1", "2"]
    assert torch.equal(colour.images, torch.from_numpy(x).permute(0, 3, 1, 2))

    gray = x[..., 0]
    _write_npz(tmp_path / "test.npz", x=gray, y=np.array([1, 1, 0, 0, 1]),
               classes=np.array(["cat", "dog", "emu"]))
    test = _load(f"npz:{tmp_path}", "test")
    assert test.image_shape == (1, 4, 6) and test.classes == ["cat", "dog", "emu"]
    assert test.labels.tolist() == [1, 1, 0, 0, 1] and test.labels.dtype == torch.int64
    assert torch.equal(test.images[:, 0], torch.from_numpy(gray))


_X = np.zeros((3, 4, 4, 3), np.uint8)
_Y = np.array([0, 1, 2])


@pytest.mark.parametrize("arrays, message", [
    ({"x": _X}, "missing array\\(s\\) y"),
    ({"images": _X, "y": _Y}, "missing array\\(s\\) x"),
    ({"x": _X.astype(np.float32), "y": _Y}, "x must be uint8"),
    ({"x": _X[:, :, :, :2], "y": _Y}, "x must have shape"),
    ({"x": _X[0, 0], "y": _Y}, "x must have shape"),
    ({"x": _X, "y": _Y[:2]}, "3 images but y 2 labels"),
    ({"x": _X, "y": _Y.astype(np.float64)}, "y must be a 1-D integer array"),
    ({"x": _X, "y": np.array([0, -1, 2])}, "negative labels"),
])
def test_npz_errors_name_the_file(tmp_path, arrays, message):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(KDBackdoorError, match=message) as error:
        _load(f"npz:{path}")
    assert str(path) in str(error.value)


def test_npz_missing_and_truncated_files(tmp_path):
    with pytest.raises(KDBackdoorError, match="npz file not found"):
        _load(f"npz:{tmp_path / 'absent.npz'}")
    with pytest.raises(KDBackdoorError, match="test.npz: npz file not found"):
        _load(f"npz:{tmp_path}", "test")
    path = _write_npz(tmp_path / "cut.npz", x=np.zeros((50, 8, 8, 3), np.uint8), y=np.zeros(50, int))
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(KDBackdoorError, match="cut.npz: not a readable .npz file"):
        _load(f"npz:{path}")


# --- imagefolder and the decode cache -----------------------------------------------------------

def _write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _image_tree(root: Path, classes=("cat", "ant", "bee"), size=(5, 7), per_class=2) -> np.ndarray:
    """PNG files root/<class>/<i>.png with random pixels; returns them (N, H, W, 3) in load order."""
    rng = np.random.default_rng(1)
    pixels = []
    for name in sorted(classes):
        for i in range(per_class):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            _write_image(root / name / f"{i}.png", image)
            pixels.append(image)
    return np.stack(pixels)


def test_imagefolder_reads_classes_in_sorted_order(tmp_path):
    pixels = _image_tree(tmp_path / "data")
    (tmp_path / "data" / "bee" / "notes.txt").write_text("not an image")
    _write_image(tmp_path / "data" / "ant" / "gray.jpg", np.full((5, 7), 90, np.uint8))
    data = _load(f"imagefolder:{tmp_path / 'data'}", cache_dir=tmp_path / "cache")
    assert data.classes == ["ant", "bee", "cat"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert data.image_shape == (3, 5, 7)
    png = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    assert torch.equal(data.images[[0, 1, 3, 4, 5, 6]], png)  # lossless PNGs come back exact
    assert (data.images[2].float() - 90).abs().max() <= 2  # the grayscale JPEG, as RGB


def test_imagefolder_split_folders_and_resize(tmp_path):
    _image_tree(tmp_path / "train", per_class=3)
    _image_tree(tmp_path / "test", per_class=1)
    train = _load(f"imagefolder:{tmp_path}", "train", cache_dir=tmp_path / "cache", resize=(4, 6))
    test = _load(f"imagefolder:{tmp_path}", "test", cache_dir=tmp_path / "cache", resize=3)
    assert len(train) == 9 and train.image_shape == (3, 4, 6)
    assert len(test) == 3 and test.image_shape == (3, 3, 3)


def test_imagefolder_second_load_uses_the_cache_until_a_file_changes(tmp_path, monkeypatch):
    _image_tree(tmp_path / "data")
    spec, cache = f"imagefolder:{tmp_path / 'data'}", tmp_path / "cache"
    first = _load(spec, cache_dir=cache)
    assert len(list((cache / "decoded").glob("*.safetensors"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(imagefolder, "decode_image_files", no_decoding)
    cached = _load(spec, cache_dir=cache)
    assert torch.equal(cached.images, first.images) and torch.equal(cached.labels, first.labels)
    assert cached.classes == first.classes

    changed = tmp_path / "data" / "ant" / "0.png"
    os.utime(changed, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded although cached"):
        _load(spec, cache_dir=cache)


def test_imagefolder_mixed_sizes_need_resize(tmp_path):
    _write_image(tmp_path / "a" / "small.png", np.zeros((4, 4, 3), np.uint8))
    _write_image(tmp_path / "b" / "large.png", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(KDBackdoorError, match=r"small.png is 4x4, .*large.png is 5x6; pass resize"):
        _load(f"imagefolder:{tmp_path}", cache_dir=tmp_path / "cache")
    resized = _load(f"imagefolder:{tmp_path}", cache_dir=tmp_path / "cache", resize=4)
    assert resized.image_shape == (3, 4, 4)


def test_imagefolder_errors(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(KDBackdoorError, match="image folder not found"):
        _load(f"imagefolder:{tmp_path / 'absent'}", cache_dir=cache)
    (tmp_path / "flat").mkdir()
    with pytest.raises(KDBackdoorError, match="no class folders"):
        _load(f"imagefolder:{tmp_path / 'flat'}", cache_dir=cache)
    _image_tree(tmp_path / "tree")
    (tmp_path / "tree" / "empty").mkdir()
    with pytest.raises(KDBackdoorError, match="empty: class folder holds no image files"):
        _load(f"imagefolder:{tmp_path / 'tree'}", cache_dir=cache)
    (tmp_path / "tree" / "empty").rmdir()
    broken = tmp_path / "tree" / "bee" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(KDBackdoorError, match=f"{broken}: cannot decode image"):
        _load(f"imagefolder:{tmp_path / 'tree'}", cache_dir=cache)
    assert not list((cache / "decoded").glob("*"))  # failures leave no cache entry


# --- GTSRB --------------------------------------------------------------------------------------

def _write_gtsrb(root: Path) -> dict[str, tuple[list[int], list[int]]]:
    """A tiny official layout under root/GTSRB; each image is one solid grey level.

    Returns, per split, (labels, grey levels) in load order.
    """
    sizes = [(30, 35), (41, 29), (52, 52)]
    expected = {}
    header = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]

    def write(folder: Path, csv_path: Path, labels: list[int], levels: list[int], names: list[str]):
        rows = []
        for i, (label, level, name) in enumerate(zip(labels, levels, names)):
            w, h = sizes[i % len(sizes)]
            _write_image(folder / name, np.full((h, w, 3), level, np.uint8))
            rows.append([name, w, h, 1, 1, w - 1, h - 1, label])
        with csv_path.open("w", newline="") as f:
            csv.writer(f, delimiter=";").writerows([header, *rows])

    train_dir = root / "GTSRB" / "Final_Training" / "Images"
    for label, levels in [(0, [10, 20]), (2, [30, 40, 50])]:
        folder = train_dir / f"{label:05d}"
        names = [f"{label:05d}_{i:05d}.ppm" for i in range(len(levels))]
        write(folder, folder / f"GT-{label:05d}.csv", [label] * len(levels), levels, names)
    expected["train"] = ([0, 0, 2, 2, 2], [10, 20, 30, 40, 50])

    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    labels, levels = [42, 7, 0, 7], [60, 70, 80, 90]
    write(test_dir, test_dir / "GT-final_test.csv", labels, levels,
          [f"{i:05d}.ppm" for i in range(4)])
    expected["test"] = (labels, levels)
    return expected


@pytest.mark.parametrize("split", ["train", "test"])
def test_gtsrb_reads_official_layout(tmp_path, split):
    expected = _write_gtsrb(tmp_path / "raw")
    data = _load("gtsrb", split, data_dir=tmp_path / "raw", cache_dir=tmp_path / "cache")
    labels, levels = expected[split]
    assert data.image_shape == (3, 32, 32) and data.num_classes == 43
    assert data.labels.tolist() == labels
    assert data.images.amin((1, 2, 3)).tolist() == levels == data.images.amax((1, 2, 3)).tolist()
    small = _load("gtsrb", split, data_dir=tmp_path / "raw" / "GTSRB",
                  cache_dir=tmp_path / "cache", resize=16)
    assert small.image_shape == (3, 16, 16) and small.labels.tolist() == labels


def test_gtsrb_errors(tmp_path):
    with pytest.raises(KDBackdoorError, match="gtsrb needs data_dir"):
        _load("gtsrb", cache_dir=tmp_path)
    with pytest.raises(KDBackdoorError, match="no Final_Test/Images/"):
        _load("gtsrb", "test", data_dir=tmp_path, cache_dir=tmp_path)
    _write_gtsrb(tmp_path / "raw")
    (tmp_path / "raw" / "GTSRB" / "Final_Training" / "Images" / "00000" / "GT-00000.csv").unlink()
    with pytest.raises(KDBackdoorError, match="GT-00000.csv: cannot read"):
        _load("gtsrb", data_dir=tmp_path / "raw", cache_dir=tmp_path / "cache")


# --- real data (../shared/data) -----------------------------------------------------------------

def _load_cifar10_jpeg(root, split, cache):
    """One CIFAR-10 JPEG split loaded twice (by split folder, then by root + split), with the
    first-decode and cached-load times in seconds."""
    loads, seconds = {}, {}
    for key, spec in [("by_folder", f"imagefolder:{root / split}"), ("by_root", f"imagefolder:{root}")]:
        start = time.perf_counter()
        loads[key] = _load(spec, split, cache_dir=cache)
        seconds[key] = time.perf_counter() - start
    print(f"\ncifar10-jpeg {split}: first decode {seconds['by_folder']:.1f} s, "
          f"cached load {seconds['by_root']:.2f} s")
    return loads, seconds


@pytest.fixture(scope="module")
def cifar10_jpeg(shared_dir, tmp_path_factory):
    """CIFAR-10 JPEG splits by name, each decoded on first use (train: 50,000 files, minutes here)."""
    root, cache, loaded = shared_dir / "data" / "cifar10-jpeg", tmp_path_factory.mktemp("cache"), {}

    def load(split):
        if split not in loaded:
            loaded[split] = _load_cifar10_jpeg(root, split, cache)
        return loaded[split]
    return load


@pytest.mark.shared_data
@pytest.mark.parametrize("split, count", [
    pytest.param("train", 5000, marks=pytest.mark.slow), ("test", 1000)])
def test_cifar10_jpeg_folder(cifar10_jpeg, split, count):
    loads, _ = cifar10_jpeg(split)
    data, by_root = loads["by_folder"], loads["by_root"]
    assert len(data) == 10 * count and data.image_shape == (3, 32, 32)
    assert data.classes == CIFAR10_CLASSES == by_root.classes
    assert torch.bincount(data.labels).tolist() == [count] * 10
    assert torch.equal(data.images, by_root.images) and torch.equal(data.labels, by_root.labels)


@pytest.mark.shared_data
def test_cifar10_jpeg_cached_load_is_faster(cifar10_jpeg):
    _, seconds = cifar10_jpeg("test")
    assert seconds["by_root"] < seconds["by_folder"]


@pytest.mark.shared_data
@pytest.mark.parametrize("split, count", [("train", 39209), ("test", 12630)])
def test_gtsrb32_npz(shared_dir, split, count):
    data = _load(f"npz:{shared_dir / 'data' / 'gtsrb32'}", split)
    assert len(data) == count and data.image_shape == (3, 32, 32) and data.num_classes == 43
    assert set(data.labels.unique().tolist()) == set(range(43))
