"""Tasks: a teacher model with its data, the thing a study compresses.

A :class:`Task` is plain data. Built-in tasks are registered by name in
``TASKS``; each is built by a function ``make(seed) -> Task``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from search.errors import ConfigError
from search.tasks._base import Split, Task

__all__ = ["Split", "TASKS", "Task", "load_task"]


def _digits(seed: int) -> Task:
    from search.tasks.digits import make_task

    return make_task(seed)


TASKS: dict[str, Callable[[int], Task]] = {"digits": _digits}


@functools.cache
def load_task(name: str, seed: int = 0) -> Task:
    """Build (and cache in this process) the task ``name``; trains its teacher on first use."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    return factory(seed)
