"""A test hook: make chosen stages of chosen trials fail, to prove a study survives them.

``SEARCH_FAULTS="quantize@3,measure@5"`` makes trial 3 raise on entering its
quantize stage and trial 5 on entering measure; ``stage@*`` hits every trial;
``prune@*+2`` does not raise but sleeps 2 s (a slow trial, to be caught mid-way).
The variable is read at each stage entry, in whatever process runs the stage
(local Ray workers inherit the driver's environment). Unset, it costs one
dictionary lookup. Never set it outside tests.
"""

from __future__ import annotations

import os
import time

__all__ = ["ENV", "InjectedFault", "inject"]

ENV = "SEARCH_FAULTS"


class InjectedFault(RuntimeError):
    """The failure a fault spec asked for."""


def inject(stage: str, trial: int) -> None:
    """Raise :class:`InjectedFault` (or sleep) when ``$SEARCH_FAULTS`` names this stage of
    this trial."""
    spec = os.environ.get(ENV)
    for item in spec.split(",") if spec else ():
        name, _, target = item.strip().partition("@")
        number, _, delay = target.partition("+")
        if name != stage or number.strip() not in ("*", str(trial)):
            continue
        if delay:
            time.sleep(float(delay))
        else:
            raise InjectedFault(f"injected fault ({ENV}={spec!r})")
