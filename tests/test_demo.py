"""The demo: the packaged run (slow) and the same code path on a tiny sweep of the same shape."""

import json
import re

import pytest

from kdbackdoor.cli import main
from kdbackdoor.demo import DEMO_MARKER, demo_config, run_demo
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.config import read_yaml


def write_sweep(sweep: dict, path):
    """Write a sweep (a dict) as YAML to ``path``; return the path."""
    import yaml
    path.write_text(yaml.safe_dump(sweep))
    return path


def tiny_demo_config(tmp_path):
    """The packaged digits demo with a few epochs and iterations, fewer and cheaper poisons and a
    small attack student: minutes become seconds."""
    sweep = read_yaml(demo_config("digits"))
    sweep["config"]["teacher"]["train"]["epochs"] = 4
    attack, data_free, defended = sweep["zip"]["distill"]
    attack["train"]["epochs"] = 2
    attack["student_arch"] = "small-cnn"
    sweep["zip"]["poison"][0].update(rate=0.05, engine={**sweep["zip"]["poison"][0]["engine"], "steps": 10})
    for run in (data_free, defended):
        run["data_free"] = {**run["data_free"], "iterations": 3, "synthesis_steps": 10, "student_steps": 10}
    return write_sweep(sweep, tmp_path / "tiny-demo.yaml")


def test_the_demo_code_path_writes_its_table_report_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_demo(out, config=tiny_demo_config(tmp_path), device="cpu", progress=False)
    assert json.loads((out / DEMO_MARKER).read_text()) == summary
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html
    assert len([run for run in (out / "results" / "runs").iterdir() if run.is_dir()]) == 3
    index = (out / "results" / "index.csv").read_text().splitlines()
    assert len(index) == 4 and all("complete" in line for line in index[1:])
    attack, data_free = summary["poisoned_distillation"], summary["data_free"]
    records = {record["name"]: record for record in
               (json.loads(path.read_text()) for path in (out / "results" / "runs").glob("*/metrics.json"))}
    # the table reports the runs' own measurements, each in its place
    expected = {("poisoned-distillation-set", "teacher_metrics"): attack["clean_teacher"],
                ("poisoned-distillation-set", "metrics"): attack["student"],
                ("poisoned-distillation-set", "baseline_metrics"): attack["unpoisoned_student"],
                ("data-free", "teacher_metrics"): data_free["backdoored_teacher"],
                ("data-free", "metrics"): data_free["student"], ("data-free-abd", "metrics"): data_free["student_with_abd"]}
    for (name, section), shown in expected.items():
        assert (shown["acc"], shown["asr"]) == (records[name][section]["acc"], records[name][section]["asr"])
    assert attack["clean_teacher"]["acc"] > 0.8 and data_free["backdoored_teacher"]["asr"] > 0.8  # 4 epochs suffice
    detection = attack["filter"]
    assert attack["counts"]["kept"] == detection["poisons"] > 0
    assert detection["true_positives"] <= min(detection["flagged"], detection["poisons"])
    assert detection["recall"] == pytest.approx(detection["true_positives"] / detection["poisons"])
    assert data_free["backdoored_teacher"]["acc_after_reload"] == data_free["backdoored_teacher"]["acc"]
    abd = [json.loads(path.read_text()) for path in (out / "results" / "runs").glob("*/metrics.json")]
    abd = [record for record in abd if record["name"] == "data-free-abd"][0]
    vaccine, retrospection = abd["defense"]["parts"]  # the config's ABD settings reached the defense
    assert retrospection["config"]["start"] == 0.7 and retrospection["steps"] > 0
    assert vaccine["name"] == "sv" and vaccine["config"]["seed"] == abd["config"]["seed"] == 0
    printed = capsys.readouterr().out
    assert "student with ABD" in printed and "report.html" in printed
    assert re.search(r"AUROC \d\.\d{3}", printed)
    # `evaluate` on a demo student finds its data set and trigger through the record of its run
    attack_run = out / "results" / "runs" / records["poisoned-distillation-set"]["run_id"]
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(attack_run / "student"), "--out", str(tmp_path / "evaluation.json"),
              "--device", "cpu"])
    assert exit_info.value.code in (0, None)
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["dataset"] == "digits"
    assert evaluation["acc"] == pytest.approx(attack["student"]["acc"])
    assert evaluation["backdoor"]["asr"] == pytest.approx(attack["student"]["asr"])


@pytest.mark.slow  # a minute and more on 2 cores
def test_the_cifar10_recipe_runs_on_32px_rgb_images(tiny_cifar10, tmp_path):
    """`kdbackdoor demo --dataset ...` for real 32x32 RGB data: the CIFAR-10 sweep, shrunk, on 200
    real CIFAR-10 training images."""
    sweep = read_yaml(demo_config("cifar10"))
    sweep["config"]["teacher"]["arch"] = "small-cnn"  # the recipe's fast-cnn-half takes a minute here
    sweep["config"]["teacher"]["train"].update(epochs=4, batch_size=32)
    sweep["config"]["data"]["test_subset"] = None
    # a teacher trained on 200 images is unsure of everything: stronger poisons pass its verification
    sweep["zip"]["poison"][0]["engine"] = {"eps": "64/255", "step_size": "8/255", "steps": 20}
    attack, data_free, defended = sweep["zip"]["distill"]
    attack["subset"] = None
    attack["train"]["epochs"] = 1
    for run in (data_free, defended):
        run["data_free"] = {"iterations": 2, "synthesis_steps": 3, "synthesis_batch_size": 16, "batch_size": 16,
                            "student_steps": 3}
    config = write_sweep(sweep, tmp_path / "tiny-cifar10-demo.yaml")
    summary = run_demo(tmp_path / "demo", dataset=tiny_cifar10, config=config, device="cpu", progress=False)
    assert summary["poisoned_distillation"]["counts"]["kept"] > 0
    records = [json.loads(path.read_text()) for path in (tmp_path / "demo" / "results" / "runs").glob("*/metrics.json")]
    assert sorted(record["name"] for record in records) == ["data-free", "data-free-abd", "poisoned-distillation-set"]
    assert all(record["config"]["data"]["dataset"] == tiny_cifar10 for record in records)
    assert (tmp_path / "demo" / "report.html").exists()


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(KDBackdoorError, match="not empty"):
        run_demo(tmp_path, device="cpu", progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_demo_refuses_a_sweep_of_another_shape(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("name: other\nseeds: [0, 1]\n")
    with pytest.raises(KDBackdoorError, match="three runs"):
        run_demo(tmp_path / "out", config=path, device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_demo_command_rejects_an_unknown_data_set(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["kdbackdoor", "demo", "--out", str(tmp_path / "out"), "--dataset", "mnist"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "mnist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_packaged_demo_shows_both_attacks(tmp_path):
    """The README's main job, as shipped: both backdoors take, the unpoisoned student stays clean."""
    summary = run_demo(tmp_path / "demo", device="cpu", progress=False)
    attack, data_free = summary["poisoned_distillation"], summary["data_free"]
    assert attack["clean_teacher"]["acc"] > 0.9 and attack["student"]["acc"] > 0.9
    assert attack["student"]["asr"] > attack["unpoisoned_student"]["asr"] + 0.15
    assert data_free["backdoored_teacher"]["asr"] > 0.9 and data_free["student"]["asr"] > 0.8
    assert data_free["student"]["acc"] > 0.5
