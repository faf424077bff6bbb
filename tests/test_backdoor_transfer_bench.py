"""The backdoor-transfer benchmark (benchmarks/backdoor_transfer.py), the one behind the data-free
tables in docs/, at a tiny scale: its table has a row per run, its students can be evaluated
without naming their data set, and a second call reuses finished runs instead of redoing them."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from kdbackdoor.cli import main

TINY = {"student": "small-cnn", "test_every": 3, "epochs": 1, "sr_start": 0.5,
        "methods": {"zskt": dict(iterations=4, batch_size=16, student_steps=1, eval_every=2)}}


@pytest.fixture(scope="module")
def transfer(import_benchmark):
    return import_benchmark("backdoor_transfer")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A digits small-cnn teacher with a badnets-grid backdoor (target 1), trained for one epoch."""
    folder = tmp_path_factory.mktemp("transfer") / "teacher"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _kdbackdoor(monkeypatch, "train-teacher", "--dataset", "digits", "--arch", "small-cnn", "--out", folder,
                           "--backdoor", "badnets-grid", "--target", "1", "--poison-rate", "0.1", "--epochs", "1",
                           "--crop-padding", "0", "--no-hflip", "--eval-every", "0", "--no-progress") == 0
    return folder


def _kdbackdoor(monkeypatch, *args) -> int:
    monkeypatch.setattr(sys, "argv", ["kdbackdoor", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0


def _benchmark(monkeypatch, transfer, *args) -> None:
    monkeypatch.setattr(sys, "argv", ["backdoor_transfer.py", *map(str, args)])
    transfer.main()


def test_tiny_transfer_table_students_and_reuse(transfer, teacher, import_benchmark, monkeypatch, capsys, tmp_path):
    common = import_benchmark("common")
    monkeypatch.setitem(transfer.SCALES, "tiny", TINY)
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    out = tmp_path / "bench"
    args = ["--teacher", teacher, "--scale", "tiny", "--methods", "zskt", "--defenses", "none", "abd", "--out", out]
    _benchmark(monkeypatch, transfer, *args)

    table = (tmp_path / "results" / "backdoor_transfer_tiny_bench.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == ["zskt-none", "zskt-abd", "clean-data-kd"]
    data = json.loads((tmp_path / "results" / "backdoor_transfer_tiny_bench.json").read_text())
    assert data["runs"]["zskt-abd"]["defense"]["name"] == "abd"
    assert [row["iteration"] for row in data["runs"]["zskt-none"]["history"]] == [2, 4]
    assert all(run["bare_loop_images_per_s"] > 0 for run in data["runs"].values())
    assert "×)" in next(line for line in table.splitlines() if line.startswith("| zskt-none"))

    capsys.readouterr()
    assert _kdbackdoor(monkeypatch, "evaluate", "--model", out / "zskt-none") == 0  # no --dataset needed
    evaluated = capsys.readouterr().out
    assert "digits" in evaluated and "ASR" in evaluated

    def must_not_run(*_, **__):
        raise AssertionError("a finished run was made again")
    monkeypatch.setattr(transfer, "distill_data_free", must_not_run)
    monkeypatch.setattr(transfer, "distill", must_not_run)
    _benchmark(monkeypatch, transfer, *args)
    again = json.loads((tmp_path / "results" / "backdoor_transfer_tiny_bench.json").read_text())
    assert again["runs"]["zskt-none"]["metrics"] == data["runs"]["zskt-none"]["metrics"]


def test_table_has_rows_that_another_call_finished_meanwhile(transfer, teacher, import_benchmark, monkeypatch, tmp_path):
    """Calls side by side share --out; whichever writes the table last lists every finished run,
    including those another call finished after this one started (a missing row, 2026-11-23)."""
    common = import_benchmark("common")
    monkeypatch.setitem(transfer.SCALES, "tiny", TINY)
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    _benchmark(monkeypatch, transfer, "--teacher", teacher, "--scale", "tiny", "--methods", "zskt", "--defenses",
               "sr", "--out", tmp_path / "other")

    shared = tmp_path / "shared"
    real_distill = transfer.distill

    def other_call_finishes(*args, **kwargs):  # while this call makes clean-data KD, another finishes zskt-sr
        shutil.copytree(tmp_path / "other" / "zskt-sr", shared / "zskt-sr")
        return real_distill(*args, **kwargs)
    monkeypatch.setattr(transfer, "distill", other_call_finishes)
    _benchmark(monkeypatch, transfer, "--teacher", teacher, "--scale", "tiny", "--methods", "zskt", "--defenses",
               "none", "--out", shared)
    table = (tmp_path / "results" / "backdoor_transfer_tiny_shared.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == ["zskt-none", "zskt-sr", "clean-data-kd"]
