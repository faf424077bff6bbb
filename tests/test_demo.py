import json

import pytest
import torch

from kdbackdoor.demo import DEMO_MARKER, run_demo
from kdbackdoor.errors import KDBackdoorError


def test_demo_runs_end_to_end_and_shows_the_backdoor(tmp_path):
    summary = run_demo(tmp_path / "demo", device=torch.device("cpu"), progress=False)
    assert summary["clean_teacher"]["acc"] > 0.9 and summary["backdoored_teacher"]["acc"] > 0.9
    assert summary["backdoored_teacher"]["asr"] > 0.9 and summary["clean_teacher"]["asr"] < 0.2
    assert summary["backdoored_teacher"]["acc_after_reload"] == summary["backdoored_teacher"]["acc"]
    assert json.loads((tmp_path / "demo" / DEMO_MARKER).read_text()) == summary
    assert (tmp_path / "demo" / "trigger.png").stat().st_size > 0
    attack = summary["poisoned_distillation"]
    assert attack["student"]["asr"] > attack["unpoisoned_student"]["asr"] + 0.1
    assert attack["student"]["acc"] > 0.9
    assert (tmp_path / "demo" / "student" / "baseline" / "model.safetensors").is_file()


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(KDBackdoorError, match="not empty"):
        run_demo(tmp_path, device=torch.device("cpu"), progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
