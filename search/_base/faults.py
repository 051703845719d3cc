"""A test hook: make chosen stages of chosen trials fail, to prove a study survives them.

``SEARCH_FAULTS="quantize@3,measure@5"`` makes trial 3 raise on entering its
quantize stage and trial 5 on entering measure; ``stage@*`` hits every trial;
``prune@*+2`` does not raise but sleeps 2 s (a slow trial, to be caught mid-way);
``prune@*?/tmp/gate`` does not raise but waits while the file ``/tmp/gate`` exists (at
most 10 minutes: trials held while a test does something outside the study).
The driver reads the variable when it starts its trials and sends it with each
task (:func:`carried`), so that workers of a cluster it joined, whose environment
is not the driver's, obey it too; a stage run in the driver's own process reads
the variable itself. Unset, it costs one dictionary lookup. Never set it outside
tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ENV", "InjectedFault", "carried", "inject"]

ENV = "SEARCH_FAULTS"
_carried: list[str] = []  # the spec of the task running in this process, if one came with it


class InjectedFault(RuntimeError):
    """The failure a fault spec asked for."""


def inject(stage: str, trial: int) -> None:
    """Raise :class:`InjectedFault` (or sleep) when ``$SEARCH_FAULTS`` names this stage of
    this trial."""
    spec = _carried[-1] if _carried else os.environ.get(ENV)
    for item in spec.split(",") if spec else ():
        name, _, target = item.strip().partition("@")
        target, _, gate = target.partition("?")
        number, _, delay = target.partition("+")
        if name != stage or number.strip() not in ("*", str(trial)):
            continue
        if delay:
            time.sleep(float(delay))
        if gate:
            deadline = time.monotonic() + 600
            while os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.1)
        if not (delay or gate):
            raise InjectedFault(f"injected fault ({ENV}={spec!r})")


@contextmanager
def carried(spec: str | None) -> Iterator[None]:
    """Obey ``spec`` (the driver's ``$SEARCH_FAULTS``; "" for none) instead of this
    process's environment while a task runs; ``None`` leaves the environment in force."""
    if spec is None:
        yield
        return
    _carried.append(spec)
    try:
        yield
    finally:
        _carried.pop()
