"""The reproduction grid runner (benchmarks/reproduction.py) at its smoke scale: rows write
self-describing result files, finished rows are never run again, several processes share the work,
a deadline stops the grid with finished rows intact, and a bundle carries every finished row."""

from __future__ import annotations

import json

import pytest

ROWS = ["attack-pgd-px2-target-lam0.5-seed0", "abd-badnets-grid-zskt-abd-seed0"]


@pytest.fixture(scope="module")
def reproduction(import_benchmark):
    return import_benchmark("reproduction")


@pytest.fixture(scope="module")
def grid(import_benchmark):
    return import_benchmark("reproduction_grid")


@pytest.fixture(scope="module")
def smoke_work(reproduction, tmp_path_factory):
    """A work folder in which the smoke grid ran ROWS (and the two teachers they need)."""
    work = tmp_path_factory.mktemp("reproduction") / "work"
    assert reproduction.main(["--scale", "smoke", "--work", str(work), "--rows", *ROWS,
                              "--bundle", str(work / "bundle.json")]) == 0
    return work


@pytest.mark.parametrize("scale", ["smoke", "cpu"])
def test_grid_has_unique_rows_three_seeds_and_the_main_questions_first(grid, scale):
    rows = grid.grid(scale)
    ids = [row.id for row in rows]
    assert len(ids) == len(set(ids))
    assert [row.kind for row in rows[:4]] == ["teacher"] * 4
    for stem in ("attack-pgd-px{}-target-lam0.5", "attack-pgd-px{}-original-lam0.5", "abd-badnets-grid-zskt-abd",
                 "abd-blend-clean-kd", "attack-fgsm-px{}-target-lam1.0"):
        main_px = grid.SCALES[scale]["attack"]["sizes"][0]
        assert {f"{stem.format(main_px)}-seed{s}" for s in (0, 1, 2)} <= set(ids), stem
    first_ablation = next(i for i, row in enumerate(rows) if row.group == "ablation")
    assert ids.index("attack-pgd-px{}-original-lam0.5-seed2".format(grid.SCALES[scale]["attack"]["sizes"][0])) \
        < ids.index("abd-badnets-grid-zskt-abd-seed2") < first_ablation
    # λ = 1 ignores labels: no original-label row that would only repeat the target-label one
    assert not any("original-lam1.0" in i for i in ids)
    # every row names a teacher the grid trains
    teachers = {row.id.removeprefix("teacher-") for row in rows if row.kind == "teacher"}
    assert {row.needs for row in rows if row.needs} <= teachers


def test_selecting_rows_keeps_the_teachers_they_need_in_front(grid):
    chosen = grid.select(grid.grid("smoke"), ["abd-blend-zskt-none-seed1"])
    assert [row.id for row in chosen] == ["teacher-blend", "abd-blend-zskt-none-seed1"]
    with pytest.raises(SystemExit, match="no row matches"):
        grid.select(grid.grid("smoke"), ["nothing-*"])


def test_rows_write_result_files_with_command_device_seed_and_metrics(smoke_work):
    for row_id in ["teacher-clean", "teacher-badnets-grid", *ROWS]:
        result = json.loads((smoke_work / "rows" / f"{row_id}.json").read_text())
        assert result["row"] == row_id and result["scale"] == "smoke"
        assert result["command"].startswith("python benchmarks/reproduction.py --scale smoke")
        assert row_id in result["row_command"] and result["device"].startswith("cpu")
        assert result["torch"] and result["seed"] == 0
        assert 0 <= result["metrics"]["acc"] <= 1
    teacher = json.loads((smoke_work / "rows" / "teacher-badnets-grid.json").read_text())
    assert teacher["backdoor"]["trigger"]["name"] == "badnets-grid" and "asr" in teacher["metrics"]
    attack = json.loads((smoke_work / "rows" / f"{ROWS[0]}.json").read_text())
    assert attack["poisons"]["counts"]["kept"] > 0 and attack["params"]["kd_lambda"] == 0.5
    abd = json.loads((smoke_work / "rows" / f"{ROWS[1]}.json").read_text())
    assert abd["defense"]["name"] == "abd" and abd["defense_settings"]["vaccine"]["tail_test"] is False
    assert [h["iteration"] for h in abd["history"]] == [2, 4]
    bundle = json.loads((smoke_work / "bundle.json").read_text())
    assert set(bundle["rows"]) == {"teacher-clean", "teacher-badnets-grid", *ROWS}
    assert bundle["machine"]["torch"] and bundle["command"].startswith("python benchmarks/reproduction.py")


def test_finished_rows_are_not_run_again(reproduction, smoke_work, monkeypatch, capsys):
    def must_not_run(*_, **__):
        raise AssertionError("a finished row was run again")
    monkeypatch.setattr(reproduction, "run_row", must_not_run)
    assert reproduction.main(["--scale", "smoke", "--work", str(smoke_work), "--rows", *ROWS]) == 0
    assert "4 of 4 rows already finished; running 0" in capsys.readouterr().out


def test_original_labels_put_each_poison_back_under_its_source_label(reproduction, smoke_work):
    """The label mode that separates distillation from label poisoning: the same poisons, labelled
    with their source images' classes (never the target), and a different student."""
    row = "attack-pgd-px2-original-lam0.5-seed0"
    assert reproduction.main(["--scale", "smoke", "--work", str(smoke_work), "--rows", row]) == 0
    original = json.loads((smoke_work / "rows" / f"{row}.json").read_text())
    target = json.loads((smoke_work / "rows" / f"{ROWS[0]}.json").read_text())
    assert original["poisons"] == target["poisons"]  # one crafted set, shared
    assert original["train"]["size"] == target["train"]["size"]
    assert original["train"]["name"].endswith("-original-labels")


def test_deadline_stops_before_more_rows_and_bundles_what_is_finished(reproduction, smoke_work, tmp_path, capsys):
    bundle = tmp_path / "out" / "bundle.json"
    assert reproduction.main(["--scale", "smoke", "--work", str(smoke_work), "--rows", "abd-badnets-grid-*-seed1",
                              "--deadline-s", "0", "--jobs", "2", "--bundle", str(bundle)]) == 0
    assert not (smoke_work / "rows" / "abd-badnets-grid-zskt-none-seed1.json").exists()
    assert set(json.loads(bundle.read_text())["rows"]) >= {"teacher-clean", *ROWS}


def test_parallel_jobs_run_rows_in_separate_processes(reproduction, smoke_work, capsys):
    rows = ["attack-unpoisoned-lam0.0-seed0", "attack-pgd-px2-original-lam0.0-seed0"]
    assert reproduction.main(["--scale", "smoke", "--work", str(smoke_work), "--rows", *rows, "--jobs", "2",
                              "--threads", "1"]) == 0
    for row in rows:
        result = json.loads((smoke_work / "rows" / f"{row}.json").read_text())
        assert result["params"]["kd_lambda"] == 0.0
    assert "FAILED" not in capsys.readouterr().out


def test_reproduction_page_is_current(import_benchmark):
    pages, doc = import_benchmark("pages"), import_benchmark("reproduction_doc")
    assert pages.stale(doc.PAGES) == [], "run python benchmarks/reproduction_doc.py"


def test_page_figures_are_mean_and_std_over_seeds_with_the_effect_count(import_benchmark, monkeypatch):
    doc = import_benchmark("reproduction_doc")
    rows = {f"abd-blend-zskt-none-seed{s}": ({"seed": s, "date": "2026-12-04", "device": "d", "torch": "t",
                                              "metrics": {"acc": acc, "asr": asr}}, "reproduction_x")
            for s, (acc, asr) in enumerate([(0.5, 0.9), (0.6, 0.3), (0.7, 0.6)])}
    monkeypatch.setattr(doc, "link", lambda text, name, page, fmt: f"{text}<{name}>")
    figures = doc.Figures(rows)
    assert figures.cell("abd-blend-zskt-none") == "60.0 ± 30.0 (n=3)<reproduction_x>"
    assert figures.pair("abd-blend-zskt-none") == "60.0 ± 10.0 (n=3)<reproduction_x> / 60.0 ± 30.0 (n=3)<reproduction_x>"
    assert figures.count("abd-blend-zskt-none", doc.has_backdoor) == "2 of 3"
    assert figures.cell("abd-blend-zskt-abd") == "not measured"
