"""A new SQLite MLflow store starts as a copy of an empty one, made once per MLflow version.

MLflow builds a new SQLite store by running each of its schema migrations one by one: about
1.5 s (more on a loaded machine) for every new ``search-runs/mlflow.db``. The copy is the
state those migrations leave, minus the "Default" experiment, which MLflow creates on open
with the artifact root of the store it opens, so nothing points at the template's folder.
Any failure here leaves the store to MLflow, as before.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

from search._base.paths import cache_dir

__all__ = ["seed_sqlite_store"]

log = logging.getLogger("search")
# tables the migrations themselves fill; every other table of the template must be empty
_SCHEMA_ROWS = {"alembic_version", "workspaces"}


def seed_sqlite_store(uri: str) -> None:
    """Put an empty, migrated store at ``uri``'s path when ``uri`` names a SQLite file that
    does not exist yet; otherwise do nothing."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or "?" in uri:
        return
    path = Path(uri[len(prefix):])
    if path.exists() or not path.parent.is_dir():
        return
    try:
        template = _template()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            _copy_db(template, Path(tmp))
            os.link(tmp, path)  # never over a store another driver has just made
        except FileExistsError:
            pass
        finally:
            Path(tmp).unlink(missing_ok=True)
    except Exception as exc:  # noqa: BLE001 - MLflow then builds the store itself
        log.debug("MLflow store %s not seeded from a template: %s", path, exc)


def _template() -> Path:
    """The empty store of this MLflow version in the cache directory, made on first use."""
    import mlflow
    from mlflow.tracking import MlflowClient

    path = cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".mlflow-template-") as work:
        built = Path(work) / "store.db"
        MlflowClient(f"sqlite:///{built}").search_experiments()  # runs the migrations
        with closing(sqlite3.connect(built)) as con, con:  # closed, after a commit
            con.execute("DELETE FROM experiments")
            tables = [r[0] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]
            filled = [t for t in tables if t not in _SCHEMA_ROWS
                      and con.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]]
        if filled:
            raise RuntimeError(f"a new store has rows in {filled}: not an empty template")
        staged = Path(work) / "template.db"
        _copy_db(built, staged)
        os.replace(staged, path)
    return path


def _copy_db(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database (its backup API: whatever its journal mode)."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
