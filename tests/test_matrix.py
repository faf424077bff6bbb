"""`kdbackdoor matrix`: expansion, a tiny run end to end, resumption and the leaderboard."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from kdbackdoor.cli import app
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.leaderboard import _mark_best
from kdbackdoor.experiment.matrix import load_matrix

TINY = {
    "name": "tiny",
    "config": {
        "data": {"dataset": "digits", "test_subset": 200},
        "teacher": {"arch": "small-cnn", "train": {"epochs": 2, "batch_size": 128, "lr": 0.05, "crop_padding": 0,
                                                   "hflip": False, "eval_every": 0}},
        "distill": {"student_arch": "small-cnn", "subset": 300, "kd": {"kd_lambda": 1.0},
                    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "crop_padding": 0, "hflip": False,
                              "eval_every": 0}},
    },
    "attacks": {"badnets": {"teacher.backdoor": {"trigger": "badnets-square:size=12", "rate": 0.1}},
                "backweak": {"teacher.backweak": {"epochs": 1}}},
    "methods": {"clean-kd": {"distill.method": "dataset"}},
    "defenses": {"none": {}, "nad": {"distill.defense": "nad",
                                     "distill.nad": {"clean_size": 50, "teacher_epochs": 1, "epochs": 1}},
                 "abd": {"distill.defense": "abd"}},
    "seeds": [0, 1],
}


def write(tmp_path, spec):
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_expansion_labels_every_cell_and_leaves_out_defenses_that_do_not_apply(tmp_path):
    matrix = load_matrix(write(tmp_path, TINY))
    assert len(matrix.runs) == 2 * 1 * 2 * 2  # abd does not apply to dataset KD
    assert matrix.skipped == ["badnets × clean-kd × abd: defense abd does not apply to dataset",
                              "backweak × clean-kd × abd: defense abd does not apply to dataset"]
    labels = {(r.label["attack"], r.label["defense"], r.label["seed"]) for r in matrix.runs}
    assert ("backweak", "nad", 1) in labels and len(labels) == 8
    assert len({r.run_id for r in matrix.runs}) == 8


def test_a_bad_cell_is_named(tmp_path):
    spec = {**TINY, "methods": {"broken": {"distill.kd.kd_lambda": 2}}}
    with pytest.raises(KDBackdoorError, match="broken"):
        load_matrix(write(tmp_path, spec))
    with pytest.raises(KDBackdoorError, match="none"):
        load_matrix(write(tmp_path, {**TINY, "defenses": {"nad": {"distill.defense": "nad"}}}))


def test_matrix_command_runs_resumes_and_writes_the_leaderboard(tmp_path):
    path = write(tmp_path, {**TINY, "attacks": {"backweak": TINY["attacks"]["backweak"]}})
    results = tmp_path / "results"
    runner = CliRunner()
    first = runner.invoke(app, ["matrix", str(path), "--results", str(results), "--no-progress"])
    assert first.exit_code == 0, first.output
    assert "4 runs completed" in first.output
    board = json.loads((results / "leaderboard.json").read_text())
    assert board["runs_complete"] == 4 and board["runs_missing"] == 0
    cells = {c["defense"]: c for c in board["cells"]}
    assert set(cells) == {"none", "nad"} and cells["none"]["seeds"] == 2
    for row in board["runs"]:
        assert row["transfer"] == pytest.approx(row["asr"] / row["teacher_asr"])
        assert 0 <= row["acc"] <= 1 and 0 <= row["asr"] <= 1
    assert cells["none"]["acc_cost"]["mean"] == 0
    nad_runs = [r for r in board["runs"] if r["defense"] == "nad"]
    for row in nad_runs:
        none = next(r for r in board["runs"] if r["defense"] == "none" and r["seed"] == row["seed"])
        assert row["acc_cost"] == pytest.approx(none["acc"] - row["acc"])
    assert sum(c["best"] for c in board["cells"]) == 1
    assert "Leaderboard" in (results / "leaderboard.md").read_text()
    assert "<table>" in (results / "leaderboard.html").read_text()
    again = runner.invoke(app, ["matrix", str(path), "--results", str(results), "--no-progress"])
    assert again.exit_code == 0 and "0 runs completed, 4 already complete" in again.output


def cell(defense, asr, cost):
    return {"attack": "a", "method": "m", "defense": defense, "asr": {"mean": asr}, "acc_cost": {"mean": cost}}


def test_best_defense_is_the_lowest_asr_within_the_acc_cost():
    cells = [cell("none", 0.9, 0.0), cell("cheap", 0.5, 0.01), cell("dear", 0.1, 0.2)]
    _mark_best(cells, 0.05)
    assert [c["defense"] for c in cells if c["best"]] == ["cheap"]
    _mark_best(cells, 0.3)
    assert [c["defense"] for c in cells if c["best"]] == ["dear"]
    useless = [cell("none", 0.2, 0.0), cell("worse", 0.4, 0.0)]
    _mark_best(useless, 0.05)
    assert [c["defense"] for c in useless if c["best"]] == ["none"]
