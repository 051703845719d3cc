"""A new SQLite MLflow store is seeded from an empty, migrated template."""

from __future__ import annotations

import sqlite3

from mlflow.tracking import MlflowClient

from search.results._mlflow_store import seed_sqlite_store


def test_a_seeded_store_is_an_empty_store_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        seed_sqlite_store(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        assert (tmp_path / name / "mlflow.db").stat().st_size > 0
    (template,) = (tmp_path / "cache").glob("mlflow-*-empty.db")
    with sqlite3.connect(template) as con:
        assert con.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)
    client = MlflowClient(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    made = client.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())
    client.create_run(made)
    default = client.get_experiment("0")  # made on open, where MLflow itself would put it
    assert default.name == "Default" and str(tmp_path) in default.artifact_location
    other = MlflowClient(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    assert [e.name for e in other.search_experiments()] == ["Default"]  # copies, not one store


def test_existing_stores_and_other_uris_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path / "cache"))
    existing = tmp_path / "mlflow.db"
    existing.write_bytes(b"")
    seed_sqlite_store(f"sqlite:///{existing}")
    assert existing.read_bytes() == b""
    seed_sqlite_store(f"sqlite:///{tmp_path / 'missing-dir' / 'mlflow.db'}")
    seed_sqlite_store("http://127.0.0.1:5000")
    seed_sqlite_store(f"sqlite:///{tmp_path / 'q.db'}?timeout=5")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "missing-dir").exists()
    assert not (tmp_path / "q.db").exists()
