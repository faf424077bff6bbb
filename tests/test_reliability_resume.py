"""SIGKILL at a seeded random named point of each long command (a process stops itself there,
see ``kdbackdoor.stop_points``), then ``--resume``: the finished run
equals an uninterrupted one with the same seed (CPU), no file is half-written at any time,
and ``kdbackdoor verify`` accepts the result.

The killed runs are real processes; the uninterrupted reference runs and the resumes run in
this process through the same entry point, with the same torch thread count (CPU results
depend on it). Two processes with the same seed giving the same numbers is thereby also checked.
"""

from __future__ import annotations

import json
import random
import signal
import zipfile

import numpy as np
import pytest
import torch

from kdbackdoor import stop_points
from kdbackdoor.models import load_checkpoint
from reliability_support import FAST_TRAINING, cli_process, comparable, record_outcome, run_cli, temporaries

GROUP = "crash (SIGKILL) and resume"
STARTUP = 900  # seconds a killed process may take to reach its stop point (a shared 2-core machine is slow)


def teacher_args(out):
    return ["train-teacher", "--out", out, "--epochs", "6", "--seed", "3", "--backdoor", "badnets-square",
            "--target", "1", "--poison-rate", "0.1", *FAST_TRAINING]


def craft_args(teacher, out):
    # target 1, the teacher's backdoor target: poisons verify at once, so the time goes into many small batches
    return ["poison-distill", "--teacher", teacher, "--out", out, "--subset", "400", "--rate", "0.3", "--target", "1",
            "--method", "pgd", "--steps", "20", "--batch-size", "4", "--seed", "5", "--no-progress", "--device", "cpu"]


def distill_args(teacher, data, out):
    return ["distill", "--teacher", teacher, "--data", data, "--out", out, "--epochs", "4", "--seed", "4",
            *FAST_TRAINING]


def dfad_args(teacher, out):
    return ["distill", "--method", "dfad", "--teacher", teacher, "--out", out, "--iterations", "24",
            "--checkpoint-every", "3", "--batch-size", "32", "--seed", "6", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"KDBACKDOOR_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, in this process: a backdoored teacher, a poisoned set, a student."""
    root = tmp_path_factory.mktemp("reference")
    runs = {"teacher": root / "teacher", "poisons": root / "poisons", "student": root / "student"}
    for args in (teacher_args(runs["teacher"]), craft_args(runs["teacher"], runs["poisons"]),
                 distill_args(runs["teacher"], runs["poisons"], runs["student"])):
        code, _, err = run_cli(*args)
        assert code == 0, err
    return runs


def kill_at(args, point: str, env) -> None:
    """Run ``args`` as a process that SIGKILLs itself at stop point ``point`` ("name:N", see
    ``kdbackdoor.stop_points``); fail unless it died there (a run that finished tests nothing)."""
    process = cli_process(*args, env={**env, stop_points.ENV: point})
    _, err = process.communicate(timeout=STARTUP)
    assert process.returncode == -signal.SIGKILL, f"the run was not killed at {point}: {err}"


def saved_epoch(out) -> int:
    return torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)["epoch"]


def assert_every_file_loads(folder):
    """What a crash leaves under its real names is complete: every file opens in full."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                for key in archive.files:
                    archive[key]
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_checkpoint(path)
        elif path.suffix == ".png":
            from PIL import Image
            with Image.open(path) as image:
                image.load()


def finish_and_compare(args, out, reference_dir, record_name="metrics.json"):
    """Resume in this process; the record equals the reference's up to timings; verify passes."""
    code, _, err = run_cli(*args, "--resume")
    assert code == 0, err
    assert temporaries(out) == [], "resume left temporaries of the killed run"
    got = json.loads((out / record_name).read_text())
    want = json.loads((reference_dir / record_name).read_text())
    assert comparable(got) == comparable(want)
    code, out_text, err = run_cli("verify", out)
    assert code == 0, out_text + err
    return got, want


def test_train_teacher_killed_twice_then_resumed_equals_uninterrupted(reference, tmp_path, env):
    rng = random.Random(11)
    out = tmp_path / "teacher"
    # 23 steps an epoch, 6 epochs: the first kill lands in epoch 2 or 3, the second one (counted
    # from where the resumed process starts) one to two epochs later, both mid-epoch
    kill_at(teacher_args(out), f"train-step:{rng.randint(30, 68)}", env)
    first = saved_epoch(out)
    assert 1 <= first <= 2 and not (out / "metrics.json").exists()
    assert_every_file_loads(out)
    kill_at(teacher_args(out) + ["--resume"], f"train-step:{rng.randint(30, 45)}", env)
    assert first < saved_epoch(out) < 6 and not (out / "metrics.json").exists()  # the resumed run progressed
    assert_every_file_loads(out)
    got, want = finish_and_compare(teacher_args(out), out, reference["teacher"])
    assert got["files"]["model.safetensors"] == want["files"]["model.safetensors"]  # identical weights, bit for bit
    assert got["environment"]["seed"] == 3 and got["environment"]["versions"]["torch"] == torch.__version__
    record_outcome(GROUP, "SIGKILL during teacher training, then --resume", "2 kills at seeded random training steps",
                   count=2)


def test_poison_crafting_killed_then_resumed_gives_the_identical_set(reference, tmp_path, env):
    rng = random.Random(12)
    out = tmp_path / "poisons"
    # the k-th atomic write of crafting saves its state: killed there, a complete temporary is left unrenamed
    kill_at(craft_args(reference["teacher"], out), f"atomic-write:{rng.randint(3, 8)}", env)
    assert (out / "craft_state.pt").exists() and not (out / "manifest.json").exists()
    assert len(temporaries(out)) == 1
    assert_every_file_loads(out)
    code, _, err = run_cli(*craft_args(reference["teacher"], out))
    assert code == 2 and "--resume" in err  # an interrupted run is never silently overwritten
    got, want = finish_and_compare(craft_args(reference["teacher"], out), out, reference["poisons"],
                                   record_name="manifest.json")
    assert not (out / "craft_state.pt").exists()
    with np.load(out / "poisoned.npz") as a, np.load(reference["poisons"] / "poisoned.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert got["counts"]["kept"] > 0
    record_outcome(GROUP, "SIGKILL during poison crafting, then --resume", "1 kill inside a seeded random state write")


def test_dataset_distillation_killed_then_resumed_equals_uninterrupted(reference, tmp_path, env):
    rng = random.Random(13)
    out = tmp_path / "student"
    args = distill_args(reference["teacher"], reference["poisons"], out)
    kill_at(args, f"train-step:{rng.randint(10, 60)}", env)  # of 64: in the student's or the baseline's training
    assert not (out / "metrics.json").exists()
    assert_every_file_loads(out)
    got, want = finish_and_compare(args, out, reference["student"])
    assert got["files"]["model.safetensors"] == want["files"]["model.safetensors"]
    assert got["baseline"]["metrics"] == want["baseline"]["metrics"]
    record_outcome(GROUP, "SIGKILL during dataset KD (student and baseline), then --resume",
                   "1 kill at a seeded random training step")


def test_data_free_distillation_killed_then_resumed_equals_uninterrupted(reference, tmp_path, env):
    rng = random.Random(14)
    out, full = tmp_path / "dfad", tmp_path / "dfad-reference"
    code, _, err = run_cli(*dfad_args(reference["teacher"], full))
    assert code == 0, err
    killed_in = rng.randint(4, 23)  # before iteration killed_in's checkpoint, if it has one
    kill_at(dfad_args(reference["teacher"], out), f"data-free-iteration:{killed_in}", env)
    assert not (out / "metrics.json").exists()
    assert_every_file_loads(out)
    code, _, err = run_cli(*dfad_args(reference["teacher"], out), "--resume")
    assert code == 0, err
    assert temporaries(out) == []
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, full))
    assert comparable(got) == comparable(want)
    assert want["resumed_from_iteration"] == 0
    assert got["resumed_from_iteration"] == 3 * ((killed_in - 1) // 3)  # the last checkpoint before the kill
    record_outcome(GROUP, "SIGKILL during data-free KD (dfad), then --resume",
                   "1 kill at a seeded random iteration")


@pytest.mark.parametrize("command", ["train-teacher", "distill"])
def test_same_seed_in_two_processes_gives_identical_metrics(reference, tmp_path, env, command):
    out = tmp_path / "run"
    args = (teacher_args(out) if command == "train-teacher"
            else distill_args(reference["teacher"], reference["poisons"], out))
    process = cli_process(*args, env=env)
    _, err = process.communicate(timeout=STARTUP * 2)
    assert process.returncode == 0, err
    got = json.loads((out / "metrics.json").read_text())
    want = json.loads((reference["teacher" if command == "train-teacher" else "student"] / "metrics.json").read_text())
    assert comparable(got) == comparable(want)
    assert got["files"]["model.safetensors"] == want["files"]["model.safetensors"]
    record_outcome("determinism", "same config and seed in another process: identical metrics and weights (CPU)",
                   command)


def test_verify_reports_changed_and_missing_files(reference, tmp_path):
    import shutil
    run = tmp_path / "teacher"
    shutil.copytree(reference["teacher"], run)
    code, out, err = run_cli("verify", run)
    assert code == 0 and "all 3 files match" in out
    with zipfile.ZipFile(run / "provenance.npz", "a") as archive:
        archive.writestr("extra.npy", b"")
    (run / "model.json").unlink()
    code, out, err = run_cli("verify", run)
    flat = " ".join((out + err).split())
    assert code == 1
    assert "provenance.npz (MISMATCH)" in flat and "model.json (MISSING)" in flat
    assert "model.safetensors │ OK" in out
    code, _, err = run_cli("verify", reference["poisons"])
    assert code == 0, err
    (run / "metrics.json").write_text("{}")
    code, _, err = run_cli("verify", run)
    assert code == 2 and "lists no file checksums" in err
    record_outcome("bad input", "tampered or unreadable checkpoint (checksum, sidecar)",
                   "verify: changed file, missing file, record without checksums", count=3)


def test_records_with_the_old_field_names_read_as_today(tmp_path):
    from kdbackdoor.experiment.runner import read_record
    from kdbackdoor.run_record import read_run_record
    old = {"wall_seconds_this_session": 3.5, "defense": {"parts": [{"name": "sv", "seconds_this_session": 1.0}]}}
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    want = {"wall_seconds_this_run": 3.5, "defense": {"parts": [{"name": "sv", "seconds_this_run": 1.0}]}}
    assert read_run_record(tmp_path) == want and read_record(tmp_path) == want
