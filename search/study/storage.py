"""Opening a study's Optuna storage: RDB URLs and journal files, created or loaded.

Kept apart from :mod:`search.study.run` so that ``search report`` and ``search export``
open a stored study with Optuna alone (no Ray, no torch).
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna

__all__ = ["create_or_load_study", "open_storage"]


def open_storage(url: str) -> str | optuna.storages.BaseStorage:
    """An Optuna storage: any RDB URL, or a journal file (``journal:///path`` or ``*.journal``).

    A journal file suits a shared filesystem where no database server runs.
    """
    path = None
    if url.startswith("journal://"):
        path = url[len("journal://"):]
    elif url.endswith((".journal", ".jsonl")) and "://" not in url:
        path = url
    if path is None:
        return url
    from optuna.storages.journal import JournalFileBackend

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(path))


def create_or_load_study(storage: str | optuna.storages.BaseStorage,
                          sampler: optuna.samplers.BaseSampler | None,
                          study_name: str) -> optuna.Study:
    """The two-objective study ``study_name`` in ``storage``, created if new.

    Drivers that open a new SQLite file at the same moment (studies launched
    together by a scheduler) race to create its tables, and Optuna lets the
    losers fail ("table studies already exists"; seen with 5 of 6 threads). By
    then the tables exist, so a loser tries again, a few times.
    """
    def create() -> optuna.Study:
        return optuna.create_study(storage=storage, sampler=sampler, study_name=study_name,
                                   directions=["maximize", "minimize"], load_if_exists=True)

    for attempt in range(3):
        try:
            return create()
        except Exception as exc:  # sqlalchemy's errors, without importing sqlalchemy
            racing = type(exc).__name__ in ("OperationalError", "IntegrityError") and (
                "already exists" in str(exc) or "UNIQUE constraint" in str(exc))
            if not racing:
                raise
            time.sleep(0.2 * (attempt + 1))
    return create()  # the last try raises what it meets
