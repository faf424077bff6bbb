"""Experiment configs: YAML + overrides, validation errors that name the key, identities and stage keys."""

from pathlib import Path

import pytest

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.config import (DEFENSES, DISTILL_METHODS, apply_overrides, load_config, parse_overrides,
                                          read_yaml, validate_config)
from kdbackdoor.experiment.stages import poison_spec, stage_key, teacher_spec
from kdbackdoor.experiment.sweep import load_sweep

from test_cli import run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_and_overrides_give_typed_values(tmp_path):
    path = _write(tmp_path / "c.yaml", "name: x\ndistill:\n  kd: {kd_lambda: 0.25}\n")
    config = load_config(path, ["distill.kd.temperature=2", "poison.engine.eps=8/255", "poison.rate=0.1",
                                "poison.trigger=badnets-square:size=4", "distill.train.hflip=false",
                                "poison.source_classes=[2, 3]"])
    assert config.distill.kd.kd_lambda == 0.25 and config.distill.kd.temperature == 2.0
    assert config.poison.engine == {"eps": pytest.approx(8 / 255)}  # fraction text became a float
    assert config.poison.rate == 0.1 and config.poison.trigger == "badnets-square:size=4"
    assert config.distill.train.hflip is False and config.poison.source_classes == [2, 3]
    assert load_config(path, ["poison=null"]).poison is None


def test_resolved_config_reads_back_identically(tmp_path):
    config = load_config(_write(tmp_path / "c.yaml", "seed: 3\nteacher: {backdoor: {trigger: blend}}\n"))
    again = validate_config(config.to_data())
    assert again == config and again.run_id() == config.run_id()
    assert "seed" not in config.to_data()["teacher"]["train"]  # stage seeds come from `seed`


@pytest.mark.parametrize("overrides, expected", [
    (["distill.kd.lamda=1"], "distill.kd.lamda: unknown key; allowed here: kd_lambda, temperature"),
    (["distill.method=fitnet"], "distill.method: Input should be " + ", ".join(f"'{m}'" for m in DISTILL_METHODS[:-1])),
    (["distill.defense=prune"], "distill.defense: Input should be 'none'"),
    (["poison.engine.epss=0.1"], "poison.engine.epss: unknown key; allowed here: eps, step_size, steps"),
    (["poison.method=pgd2"], "poison.method: Input should be 'fgsm', 'pgd', 'cw' or 'generative'"),
    (["poison.rate=1.5"], "poison.rate: Input should be less than 1"),
    (["poison.method=fgsm", "poison.early_exit=true"], "early_exit: not supported by method fgsm (only by pgd)"),
    (["teacher.train.seed=1"], "set teacher.seed (or seed), not teacher.train.seed"),
    (["distill.method=ood", "distill.data=digits"], "set distill.kd.kd_lambda to 1"),
    (["distill.method=zskt", "distill.defense=robust-kd"], "defense 'robust-kd' applies to methods dataset, ood"),
    (["distill.method=dataset", "distill.defense=sr"], "defense 'sr' applies to methods zskt, dfad, deepinversion, "
                                                        "cmi, fast, ood"),
    (["distill.method=zskt", "poison.rate=0.1"], "a poisoned distillation set needs method dataset or ood"),
    (["distill.baseline=true"], "distill.baseline compares with the unpoisoned set: it needs a poison section"),
    (["bogus=1"], "bogus: unknown key; allowed here: name, seed, device, data, teacher, poison, distill"),
])
def test_invalid_configs_name_the_key_and_what_is_allowed(tmp_path, overrides, expected):
    path = _write(tmp_path / "c.yaml", "name: x\n")
    with pytest.raises(KDBackdoorError) as error:
        load_config(path, overrides)
    assert expected in str(error.value)
    assert str(path) in str(error.value)


def test_malformed_overrides_and_files_are_refused(tmp_path):
    with pytest.raises(KDBackdoorError, match="expected KEY=VALUE"):
        parse_overrides(["distill.kd.kd_lambda"])
    with pytest.raises(KDBackdoorError, match="seed is a value"):
        apply_overrides({"seed": 1}, {"seed.x": 2})
    with pytest.raises(KDBackdoorError, match="not valid YAML"):
        load_config(_write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(KDBackdoorError, match="expected a mapping"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_run_identity_ignores_labels_and_follows_results():
    base = validate_config({})
    assert validate_config({"name": "other", "device": "cpu"}).run_id() == base.run_id()
    assert validate_config({"distill": {"kd": {"kd_lambda": 1}}}).run_id() != base.run_id()
    assert validate_config({"seed": 1}).run_id() != base.run_id()


def test_stage_keys_change_only_with_what_the_stage_depends_on():
    def keys(**overrides):
        config = validate_config(apply_overrides({"poison": {"rate": 0.05}}, overrides))
        teacher = stage_key(teacher_spec(config))
        return teacher, stage_key(poison_spec(config, teacher))

    teacher, poisons = keys()
    assert keys(**{"distill.kd.kd_lambda": 1.0}) == (teacher, poisons)  # the student only
    assert keys(**{"distill.seed": 5}) == (teacher, poisons)
    assert keys(**{"evaluation.evaluate_teacher": False}) == (teacher, poisons)
    assert keys(**{"data.test_subset": 100}) == (teacher, poisons)  # evaluation only
    changed_rate = keys(**{"poison.rate": 0.1})
    assert changed_rate[0] == teacher and changed_rate[1] != poisons
    changed_teacher = keys(**{"teacher.train.epochs": 3})
    assert changed_teacher[0] != teacher and changed_teacher[1] != poisons
    assert keys(**{"teacher.seed": 0, "seed": 4})[0] == teacher  # the teacher keeps its own seed
    assert keys(**{"seed": 4})[0] != teacher


def test_every_defense_name_is_checked_against_methods():
    for defense, methods in DEFENSES.items():
        for method in methods:
            extra = {"data": "digits", "kd": {"kd_lambda": 1}} if method == "ood" else {}
            assert validate_config({"distill": {"method": method, "defense": defense, **extra}}).distill.defense == defense


def test_abd_settings_are_typed_and_belong_to_their_defense():
    config = validate_config({"distill": {"method": "zskt", "defense": "abd", "retrospection": {"start": 0.9},
                                          "vaccine": {"coefficient": 0.5}}, "seed": 7})
    assert config.distill.retrospection.start == 0.9 and config.distill.vaccine.coefficient == 0.5
    assert "seed" not in config.to_data()["distill"]["retrospection"]  # it comes from distill.seed
    changed = validate_config({**config.to_data(), "distill": {**config.to_data()["distill"],
                                                               "retrospection": {"start": 0.5}}})
    assert changed.run_id() != config.run_id()
    with pytest.raises(KDBackdoorError, match="distill.retrospection configures defense abd or sr, not 'sv'"):
        validate_config({"distill": {"method": "zskt", "defense": "sv", "retrospection": {"start": 0.9}}})
    with pytest.raises(KDBackdoorError, match="not distill.vaccine.seed"):
        validate_config({"distill": {"method": "zskt", "defense": "sv", "vaccine": {"seed": 3}}})
    with pytest.raises(KDBackdoorError, match="portion"):
        validate_config({"distill": {"method": "zskt", "defense": "sr", "retrospection": {"portion": 0}}})


def test_shipped_configs_are_valid():
    # configs/demo links to the package's demo_configs (rglob does not follow the link)
    experiments = sorted(CONFIGS.rglob("*.yaml")) + sorted((CONFIGS / "demo").glob("*.yaml"))
    assert experiments, "configs/ holds the ready-made configs"
    sweeps = 0
    for path in experiments:
        if "attacks" in read_yaml(path):  # a matrix file
            from kdbackdoor.experiment.matrix import load_matrix
            assert load_matrix(path).runs
        elif set(read_yaml(path)) & {"base", "grid", "zip", "seeds"}:  # a sweep file
            _, runs = load_sweep(path)
            assert runs
            sweeps += 1
        else:
            load_config(path)
    assert sweeps >= 10  # attack: λ, method, rate, trigger size at CPU and paper scale; ABD table both scales; demos


def test_cli_run_refuses_an_invalid_config_before_any_work(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path / "c.yaml", "distill: {kd: {kd_lambda: 2}}\n")
    code, _, err = run(monkeypatch, capsys, "run", path, "--results", tmp_path / "results")
    assert code == 2
    assert "distill.kd.kd_lambda: Input should be less than or equal to 1" in err
    assert not (tmp_path / "results").exists()


def test_cli_dry_run_prints_resolved_config(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path / "c.yaml", "name: dry\n")
    code, out, _ = run(monkeypatch, capsys, "run", path, "distill.kd.kd_lambda=0.75", "--results",
                       tmp_path / "results", "--dry-run")
    assert code == 0
    assert "kd_lambda: 0.75" in out and "valid; the run would go to" in out
    assert not (tmp_path / "results").exists()
