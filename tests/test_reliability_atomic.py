"""Atomic writes and locked appends: nothing half-written, nothing lost when processes race or die."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdbackdoor.atomic import append_jsonl, append_line, atomic_path, locked, read_jsonl, write_json
from reliability_support import record_outcome

GROUP = "concurrency and atomic writes"

APPENDER = """
import sys
from kdbackdoor.atomic import append_jsonl
path, writer, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    append_jsonl(path, {"writer": writer, "i": i, "pad": "x" * 5000})
"""


def test_concurrent_appenders_lose_and_duplicate_no_rows(tmp_path):
    index = tmp_path / "index.jsonl"
    writers, count = 4, 60
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(index), str(w), str(count)])
             for w in range(writers)]
    assert [p.wait(timeout=60) for p in procs] == [0] * writers
    rows = read_jsonl(index)
    keys = [(r["writer"], r["i"]) for r in rows]
    assert sorted(keys) == [(w, i) for w in range(writers) for i in range(count)]
    assert index.read_text().count("\n") == writers * count
    record_outcome(GROUP, "processes appending to one index at once (append_jsonl)",
                   f"{writers} processes x {count} rows, none lost or duplicated", count=writers * count)


def test_append_cuts_the_torn_line_of_a_killed_writer(tmp_path):
    index = tmp_path / "index.jsonl"
    append_jsonl(index, {"run": 1})
    with open(index, "a") as handle:
        handle.write('{"run": 2, "tru')  # what a SIGKILL mid-write leaves behind
    assert read_jsonl(index) == [{"run": 1}]
    append_jsonl(index, {"run": 3})
    assert read_jsonl(index) == [{"run": 1}, {"run": 3}]
    assert index.read_text() == '{"run": 1}\n{"run": 3}\n'
    record_outcome(GROUP, "torn index line left by a killed appender", "cut off by the next append")


def test_append_line_refuses_embedded_newlines(tmp_path):
    with pytest.raises(ValueError, match="newline"):
        append_line(tmp_path / "x.txt", "a\nb")
    assert not (tmp_path / "x.txt").exists()


HOLDER = """
import sys, time
from kdbackdoor.atomic import locked
with locked(sys.argv[1]):
    open(sys.argv[2], "w").close()
    time.sleep(60)
"""


def test_lock_excludes_others_and_is_freed_when_its_holder_is_killed(tmp_path):
    target, ready = tmp_path / "index.jsonl", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline, "lock holder never started"
            time.sleep(0.05)
        import fcntl
        fd = os.open(tmp_path / "index.jsonl.lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now: no stale lock after a crash
        os.close(fd)
    finally:
        if holder.poll() is None:
            holder.kill()
    with locked(target):
        pass
    record_outcome(GROUP, "lock holder SIGKILLed", "lock freed by the kernel, no stale lock")


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"acc": 0.5})
    with pytest.raises(OSError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"acc": 0.')
            raise OSError(28, "No space left on device")
    assert json.loads(path.read_text()) == {"acc": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    record_outcome(GROUP, "write failing inside an atomic write", "old file kept, temporary removed")
