"""Device selection: the CPU or this machine's accelerator, whatever kind torch reports."""

import pytest
import torch

from kdbackdoor import runtime
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.runtime import select_device


def test_without_an_accelerator_auto_is_the_cpu_and_accelerators_are_refused(monkeypatch):
    monkeypatch.setattr(runtime, "_accelerator", lambda: None)
    assert select_device("auto") == torch.device("cpu") == select_device(None) == select_device("cpu")
    for name in ("cuda", "cuda:0", "mps"):
        with pytest.raises(KDBackdoorError, match="not available on this machine .it has no accelerator"):
            select_device(name)


def test_with_an_accelerator_auto_picks_it_and_only_its_kind_is_accepted(monkeypatch):
    monkeypatch.setattr(runtime, "_accelerator", lambda: torch.device("xpu", 0))
    assert select_device("auto") == torch.device("xpu", 0)
    assert select_device("xpu:1") == torch.device("xpu", 1)
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(KDBackdoorError, match="its accelerator is xpu"):
        select_device("cuda")


@pytest.mark.parametrize("name", ["tpu", "gpu0", ""])
def test_names_torch_does_not_know_are_refused(name):
    with pytest.raises(KDBackdoorError, match="unknown device"):
        select_device(name)


def test_stopwatch_sums_the_time_inside_its_blocks_even_when_one_fails():
    import time

    from kdbackdoor.runtime import Stopwatch
    watch = Stopwatch()
    with watch.timing(torch.device("cpu")):
        time.sleep(0.05)
    with pytest.raises(ValueError), watch.timing(torch.device("cpu")):
        time.sleep(0.05)
        raise ValueError
    time.sleep(0.1)  # outside: not counted
    assert 0.1 <= watch.seconds < 0.18
