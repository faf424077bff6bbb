"""Named stop points: let a process kill itself at an exact place of a long run.

Crash-and-resume checks need a process to die at a known point, not after a guessed delay
(a delay may land before anything was saved or after the run finished). Long loops call
``reached(name)`` at their natural boundaries; when the environment variable
``KDBACKDOOR_STOP_AT`` holds ``name:N``, the process sends itself SIGKILL the N-th time
(1-based, counted in this process) it reaches ``name``. Without the variable ``reached`` does
nothing. SIGKILL, not an exception: nothing gets a chance to clean up, exactly as when a machine
or an out-of-memory killer stops a run.

Points (see each caller): ``train-step`` (after an optimizer step, before the epoch's state is
saved), ``train-state-saved``, ``craft-batch`` (after a batch of poisons was crafted, before its
state is saved), ``data-free-iteration``, ``atomic-write`` (a temporary file is complete, not yet
renamed), ``sweep-run-finished`` (a run's record is written, the sweep index not yet).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "KDBACKDOOR_STOP_AT"

_counts: Counter[str] = Counter()


def parse(spec: str) -> tuple[str, int]:
    """``"name:N"`` -> ``(name, N)``; ValueError unless N is a positive integer."""
    name, _, count = spec.rpartition(":")
    if not name or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV} must look like NAME:N with N >= 1, got {spec!r}")
    return name, int(count)


def reached(name: str) -> None:
    """Count one pass through stop point ``name``; SIGKILL this process if ``$KDBACKDOOR_STOP_AT`` says so."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _counts[name] += 1
    wanted, count = parse(spec)
    if name == wanted and _counts[name] == count:
        os.kill(os.getpid(), signal.SIGKILL)
