"""CIFAR archives: download from a loopback server with checksum checks, or read from data_dir."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from kdbackdoor.data.download import ARCHIVES, RemoteFile, download
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.errors import KDBackdoorError

PER_BATCH = 3
CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
                 b"ship", b"truck"]


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=4)  # the official files are protocol 2; 4 avoids _codecs


def _batch(rng, labels_key: bytes, num_classes: int) -> dict:
    return {b"data": rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
            labels_key: rng.integers(0, num_classes, PER_BATCH).tolist(),
            b"filenames": [b"x.png"] * PER_BATCH}


def _cifar_members(name: str) -> tuple[str, dict[str, bytes], dict]:
    """(folder, member name -> pickle bytes, expected {split: (images, labels), "classes": ...})."""
    rng = np.random.default_rng(7)
    if name == "cifar10":
        splits = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        labels_key, classes = b"labels", CIFAR10_NAMES
        meta = ("batches.meta", {b"label_names": classes, b"num_cases_per_batch": PER_BATCH})
        folder = "cifar-10-batches-py"
    else:
        splits = {"train": ["train"], "test": ["test"]}
        labels_key, classes = b"fine_labels", [f"fine{i}".encode() for i in range(100)]
        meta = ("meta", {b"fine_label_names": classes,
                         b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
        folder = "cifar-100-python"
    members = {meta[0]: _pickle(meta[1])}
    expected: dict = {"classes": [c.decode() for c in classes]}
    for split, batch_names in splits.items():
        batches = [_batch(rng, labels_key, len(classes)) for _ in batch_names]
        members.update({n: _pickle(b) for n, b in zip(batch_names, batches)})
        expected[split] = (np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32),
                           sum((b[labels_key] for b in batches), []))
    return folder, members, expected


def _write_tarball(path: Path, folder: str, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


class _Server:
    """Serves a folder over HTTP on 127.0.0.1 and counts the requests."""

    def __init__(self, folder: Path):
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.requests = 0
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Yields (name -> expected arrays, server): tiny cifar10/cifar100 archives served on the
    loopback, with the ARCHIVES registry pointing at them."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    expected = {}
    with _Server(tmp_path / "www") as server:
        for name, filename in [("cifar10", "cifar-10-python.tar.gz"),
                               ("cifar100", "cifar-100-python.tar.gz")]:
            folder, members, expected[name] = _cifar_members(name)
            archive = _write_tarball(tmp_path / "www" / filename, folder, members)
            monkeypatch.setitem(
                ARCHIVES, name, RemoteFile(filename, f"{server.url}/{filename}", _sha256(archive)))
        yield expected, server


def _assert_matches(data, expected: dict, split: str) -> None:
    images, labels = expected[split]
    assert data.images.dtype == torch.uint8 and data.image_shape == (3, 32, 32)
    assert torch.equal(data.images, torch.from_numpy(images))
    assert data.labels.tolist() == labels
    assert data.classes == expected["classes"]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_downloads_verifies_and_decodes(served, tmp_path, name):
    expected, server = served
    cache = tmp_path / "cache"
    train = load_dataset(name, "train", cache_dir=cache, progress=False)
    _assert_matches(train, expected[name], "train")
    assert len(train) == (5 if name == "cifar10" else 1) * PER_BATCH
    assert train.name == f"{name}:train" and train.meta == {"source": name, "split": "train"}
    assert [p.name for p in (cache / "downloads").iterdir()] == [ARCHIVES[name].filename]
    test = load_dataset(name, "test", cache_dir=cache, download=False, progress=False)
    _assert_matches(test, expected[name], "test")
    assert server.requests == 1  # the second split reads the archive already in the cache


def test_wrong_checksum_is_rejected_and_nothing_is_kept(served, tmp_path, monkeypatch):
    _, server = served
    genuine = ARCHIVES["cifar10"]
    monkeypatch.setitem(ARCHIVES, "cifar10", RemoteFile(genuine.filename, genuine.url, "md5:" + "0" * 32))
    cache = tmp_path / "cache"
    with pytest.raises(KDBackdoorError, match="does not match checksum md5:0000"):
        load_dataset("cifar10", cache_dir=cache, progress=True)
    assert server.requests == 1
    assert list((cache / "downloads").iterdir()) == []


def test_failed_download_leaves_nothing(served, tmp_path):
    _, server = served
    missing = RemoteFile("absent.tar.gz", f"{server.url}/absent.tar.gz", "md5:" + "0" * 32)
    with pytest.raises(KDBackdoorError, match="absent.tar.gz: download failed") as failure:
        download(missing, tmp_path / "downloads", progress=False)
    assert list((tmp_path / "downloads").iterdir()) == []
    # an offline user learns how to use a local copy instead
    assert "--data-dir" in str(failure.value) and "imagefolder:PATH" in str(failure.value)


def test_no_download_without_permission(served, tmp_path):
    _, server = served
    missing = "cifar-100-python.tar.gz .*not found in .*allow downloading"
    with pytest.raises(KDBackdoorError, match=missing):
        load_dataset("cifar100", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                     download=False, progress=False)
    assert server.requests == 0


def test_cifar_from_data_dir_archive_or_extracted_folder(tmp_path):
    folder, members, expected = _cifar_members("cifar10")
    _write_tarball(tmp_path / "archive" / "cifar-10-python.tar.gz", folder, members)
    from_archive = load_dataset("cifar10", "test", data_dir=tmp_path / "archive",
                                cache_dir=tmp_path / "cache", download=False, progress=False)
    _assert_matches(from_archive, expected, "test")

    extracted = tmp_path / "extracted" / folder
    extracted.mkdir(parents=True)
    for name, data in members.items():
        (extracted / name).write_bytes(data)
    from_folder = load_dataset("cifar10", "train", data_dir=tmp_path / "extracted",
                               cache_dir=tmp_path / "cache", download=False, progress=False)
    _assert_matches(from_folder, expected, "train")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_that_would_run_code_are_refused(tmp_path, capsys):
    folder, members, _ = _cifar_members("cifar10")
    members["test_batch"] = _pickle({b"data": _Payload(), b"labels": []})
    _write_tarball(tmp_path / "cifar-10-python.tar.gz", folder, members)
    refused = "test_batch is not a CIFAR pickle .*refusing to load builtins.print"
    with pytest.raises(KDBackdoorError, match=refused):
        load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache",
                     download=False, progress=False)
    assert "must never run" not in capsys.readouterr().out


def test_corrupt_archive_is_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(KDBackdoorError, match="cifar-10-python.tar.gz: not a readable .tar.gz archive"):
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False,
                     progress=False)
