"""A full disk or an unwritable output folder: a clear error, exit code 2, nothing marked complete,
no half-written file, and once space is back ``--resume`` finishes the run without loss."""

from __future__ import annotations

import errno
import json
import os

import pytest

from kdbackdoor import atomic
from kdbackdoor.atomic import append_line
from reliability_support import FAST_TRAINING, assert_user_error, record_outcome, run_cli, temporaries

GROUP = "disk full / unwritable output"


def teacher_args(out):
    return ["train-teacher", "--out", out, "--epochs", "2", "--seed", "1", *FAST_TRAINING]


class FullDisk:
    """``os.fsync`` that fails with ENOSPC from its ``fail_at``-th call on (1-based; 0 never): every
    atomic write flushes before its rename, so each call is one file about to be committed."""

    def __init__(self, fail_at: int = 0):
        self.fail_at, self.calls = fail_at, 0
        self.real = os.fsync

    def __call__(self, fd):
        self.calls += 1
        if self.fail_at and self.calls >= self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd)


@pytest.fixture(scope="module")
def teacher_writes(tmp_path_factory):
    """How many atomic writes a clean train-teacher run makes (provenance, one state per epoch,
    weights, sidecar, record)."""
    counter = FullDisk()
    mp = pytest.MonkeyPatch()
    mp.setattr(os, "fsync", counter)
    try:
        code, _, err = run_cli(*teacher_args(tmp_path_factory.mktemp("count") / "run"))
    finally:
        mp.undo()
    assert code == 0, err
    assert counter.calls == 6
    return counter.calls


SLOW = pytest.mark.slow


# writes: 1 provenance.npz, 2-3 train_state.pt per epoch, 4 model.safetensors, 5 model.json, 6 metrics.json;
# the default suite fails a training state, the weights and the record, the slow one every write
@pytest.mark.parametrize("fail_at", [pytest.param(1, marks=SLOW), 2, pytest.param(3, marks=SLOW), 4,
                                     pytest.param(5, marks=SLOW), 6])
def test_disk_full_at_every_write_of_train_teacher(fail_at, teacher_writes, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", FullDisk(fail_at))
        assert_user_error(run_cli(*teacher_args(out)), "No space left on device")
    assert not (out / "metrics.json").exists(), "a failed run was marked complete"
    assert temporaries(out) == [], "a half-written temporary was left behind"
    code, _, err = run_cli(*teacher_args(out), "--resume")  # space is back: nothing was lost
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["metrics"]["acc"] > 0.3 and len(record["history"]) == 2
    assert run_cli("verify", out)[0] == 0
    record_outcome(GROUP, "ENOSPC at each atomic write of train-teacher, then --resume",
                   f"write {fail_at} of {teacher_writes}")


def test_disk_full_while_storing_a_poisoned_set(digits_teacher, tmp_path, monkeypatch):
    from kdbackdoor.models import save_checkpoint
    teacher = save_checkpoint(digits_teacher, tmp_path / "teacher" / "model", classes=[str(i) for i in range(10)])
    args = ["poison-distill", "--teacher", teacher, "--subset", "200", "--rate", "0.1", "--eps", "48/255",
            "--step-size", "8/255", "--steps", "10", "--batch-size", "8", "--no-progress", "--device", "cpu"]
    counter = FullDisk()
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", counter)
        code, _, err = run_cli(*args, "--out", tmp_path / "count")
        assert code == 0, err
    total = counter.calls  # crafting states, poisons.png, poisoned.npz, manifest.json
    for fail_at in (1, total - 2, total - 1, total):
        out = tmp_path / f"set{fail_at}"
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", FullDisk(fail_at))
            assert_user_error(run_cli(*args, "--out", out), "No space left on device")
        assert not (out / "manifest.json").exists() and temporaries(out) == []
        code, _, err = run_cli(*args, "--out", out, "--resume")
        assert code == 0, err
        assert run_cli("verify", out)[0] == 0
        record_outcome(GROUP, "ENOSPC while crafting or storing a poisoned set, then --resume",
                       f"write {fail_at} of {total}")


def test_output_under_a_file_is_refused_cleanly(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    out = blocker / "run"
    assert_user_error(run_cli(*teacher_args(out)), "Not a directory", str(out))
    record_outcome(GROUP, "output folder that cannot be created (a file in the way)", "train-teacher")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_cleanly(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_user_error(run_cli(*teacher_args(folder / "run")), "Permission denied")
        assert not (folder / "run").exists()
    finally:
        folder.chmod(0o700)
    record_outcome(GROUP, "read-only output folder", "train-teacher")


def test_partial_append_on_a_full_disk_is_undone(tmp_path, monkeypatch):
    index = tmp_path / "index.jsonl"
    append_line(index, "first")
    real_write = os.write

    def short_write(fd, data):
        return real_write(fd, data[:3])  # the disk filled up after 3 bytes

    monkeypatch.setattr(atomic.os, "write", short_write)
    with pytest.raises(OSError) as info:
        append_line(index, "second line")
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert index.read_text() == "first\n"
    record_outcome(GROUP, "ENOSPC in the middle of a locked append", "short write undone")
