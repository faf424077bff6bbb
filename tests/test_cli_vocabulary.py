"""One vocabulary across the command line: the same option name for the same kind of value, help
that reads cleanly, listings that say what each thing is, and defaults that suit the data set."""

from __future__ import annotations

import json
import re

import pytest

from kdbackdoor.data.sources import default_augmentation
from reliability_support import run_cli

COMMANDS = ["train-teacher", "evaluate", "poison-distill", "distill", "audit-data", "scan", "run", "sweep", "report",
            "demo", "verify"]


def help_text(command: str) -> str:
    code, out, err = run_cli(command, "--help")
    assert code == 0, err
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_value_type_on_flags_and_one_name_for_a_data_set(command):
    text = help_text(command)
    assert "<bool>" not in text
    assert not re.search(r"--data(?![-\w])", text)  # the data-set spec is --dataset everywhere
    assert "data set: data set" not in text and "see the list below" not in text


def test_the_old_data_option_name_still_works(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBACKDOOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "teacher"
    code, _, err = run_cli("train-teacher", "--data", "digits", "--out", out, "--epochs", "1", "--subset", "200",
                           "--no-progress", "--device", "cpu")
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["train"]["size"] == 200  # --subset: a seeded draw of the training split
    assert record["config"]["crop_padding"] == 1 and record["config"]["hflip"] is False  # digits' defaults


def test_listings_say_what_each_entry_is():
    for command in ("datasets", "models"):
        code, out, _ = run_cli(command)
        lines = [line for line in out.splitlines() if line.strip()]
        assert code == 0 and len(lines) >= 5
        assert all(len(line.split()) >= 3 for line in lines), lines  # a name, then a description


def test_augmentation_defaults_suit_the_data_set():
    assert default_augmentation("digits") == (1, False)
    assert default_augmentation("gtsrb") == (4, False)
    assert default_augmentation("cifar10") == (4, True)
    assert default_augmentation("imagefolder:/x", resize=64) == (8, True)


def test_distill_help_groups_its_options_by_purpose():
    text = help_text("distill")
    panels = re.findall(r"╭─ (.+?) ─", text)
    assert {"Options", "Training", "Defense (--defense)", "Teacher given as bare foreign weights"} <= set(panels)
