"""A test hook: make chosen stages of chosen trials fail, to prove a study survives them.

``SEARCH_FAULTS="quantize@3,measure@5"`` makes trial 3 raise on entering its
quantize stage and trial 5 on entering measure; ``stage@*`` hits every trial.
The variable is read at each stage entry, in whatever process runs the stage
(local Ray workers inherit the driver's environment). Unset, it costs one
dictionary lookup. Never set it outside tests.
"""

from __future__ import annotations

import os

__all__ = ["ENV", "InjectedFault", "inject"]

ENV = "SEARCH_FAULTS"


class InjectedFault(RuntimeError):
    """The failure a fault spec asked for."""


def _wanted(spec: str, stage: str, trial: int) -> bool:
    for item in spec.split(","):
        name, _, number = item.strip().partition("@")
        if name == stage and number.strip() in ("*", str(trial)):
            return True
    return False


def inject(stage: str, trial: int) -> None:
    """Raise :class:`InjectedFault` when ``$SEARCH_FAULTS`` names this stage of this trial."""
    spec = os.environ.get(ENV)
    if spec and _wanted(spec, stage, trial):
        raise InjectedFault(f"injected fault ({ENV}={spec!r})")
