"""Stop points: a process SIGKILLs itself exactly at the named pass, and only when asked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from kdbackdoor import stop_points

COUNTER = """
import sys
from kdbackdoor import stop_points
for i in range(1, 6):
    stop_points.reached("other")
    stop_points.reached("loop")
    print(i, flush=True)
"""


def run_counter(spec: str | None) -> subprocess.CompletedProcess:
    env = {} if spec is None else {stop_points.ENV: spec}
    return subprocess.run([sys.executable, "-c", COUNTER], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_the_process_dies_at_the_nth_pass_of_the_named_point():
    result = run_counter("loop:3")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["1", "2"]  # killed before printing 3


def test_without_the_variable_or_with_another_name_nothing_happens():
    assert run_counter(None).stdout.split() == ["1", "2", "3", "4", "5"]
    result = run_counter("elsewhere:1")
    assert result.returncode == 0 and result.stdout.split() == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("spec", ["loop", "loop:0", "loop:x", ":3"])
def test_a_malformed_spec_is_refused(spec):
    with pytest.raises(ValueError, match="NAME:N"):
        stop_points.parse(spec)
