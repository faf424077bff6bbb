"""Reading files that hold tensors and plain containers (resumable states, ``.pt`` weights)
without ever unpickling code.

``load_tensors_pickle`` is ``torch.load(weights_only=True)`` whose failures become a
``KDBackdoorError``: a file that holds anything else is refused, and the message names what was
refused but never suggests turning the check off (torch's own message does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdbackdoor.errors import KDBackdoorError


def refusal_reason(exc: BaseException) -> str:
    """The line of a loading error that says what went wrong (e.g. the blocked global), without
    torch's advice on loading with ``weights_only=False``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and "documentation" not in line]
    return useful[0] if useful else type(exc).__name__


def load_tensors_pickle(path: str | Path, what: str, advice: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; on failure a one-line error
    "PATH: cannot read this WHAT (REASON); ADVICE"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling fails in many ways; all of them mean "refused"
        raise KDBackdoorError(f"{path}: cannot read this {what} ({refusal_reason(exc)}); {advice}") from None
