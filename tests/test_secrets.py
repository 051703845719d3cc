"""Credentials in the storage and tracking URLs appear nowhere a study writes or prints.

The tracking URL carries ``user:password`` to a real `mlflow server` on loopback (which
ignores it). SQLite URLs cannot carry a password, so the storage is SQLite behind a
SQLAlchemy dialect that accepts (and drops) one: the URL the driver is given has the same
shape as ``postgresql://user:password@host/db``.
"""

from __future__ import annotations

import base64
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

from search._base.redact import redact
from search.results.tracking import EXPERIMENT
from tests.support.helpers import QUICK_SPACE
from tests.support.servers import free_port, start_mlflow_server, stop_mlflow_server

TRACKING_SECRET = "trk-s3cr3t-Pw"
STORAGE_SECRET = "db-s3cr3t-Pw"

class PasswordSQLite(SQLiteDialect_pysqlite):
    """SQLite reached through a URL with user, password and host, like a database server."""

    supports_statement_cache = True  # SQLite's own caching holds: only the URL differs

    def create_connect_args(self, url):  # noqa: ANN001, ANN201
        return super().create_connect_args(url._replace(username=None, password=None, host=None))


registry.register("sqlite.pw", __name__, "PasswordSQLite")

SPACE = QUICK_SPACE


@pytest.mark.parametrize("text, expected, secrets", [
    ("postgresql://user:secret@host/db", "postgresql://user:***@host/db", ["secret"]),
    ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db", ["p@ss", "ss@"]),
    ("mysql://u:a@b@c@host:3306/db?x=1", "mysql://u:***@host:3306/db?x=1", ["a@b@c"]),
    ("postgresql://host/db?user=u&password=secret", "postgresql://host/db?user=u&password=***",
     ["secret"]),
    ("https://h.example/api?token=tok123&page=2", "https://h.example/api?token=***&page=2", ["tok123"]),
    ("https://h.example/v1?api_key=K3Y", "https://h.example/v1?api_key=***", ["K3Y"]),
    ("https://b.example/o?X-Amz-Signature=abc&X-Amz-Credential=cr",
     "https://b.example/o?X-Amz-Signature=***&X-Amz-Credential=***", ["abc", "cr"]),
    ("https://cb.example/#access_token=AT9", "https://cb.example/#access_token=***", ["AT9"]),
    ("host=h user=u password=pw9 dbname=d", "host=h user=u password=*** dbname=d", ["pw9"]),
])
def test_redact_hides_every_form_of_secret(text, expected, secrets):
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent: redacting twice changes nothing


def test_redact_finds_urls_in_exception_text():
    message = ("OperationalError: connection to 'postgresql://u:p@ss@db.example:5432/optuna"
               "?sslmode=require&password=hunter2' failed; retry http://alice:pw@127.0.0.1:5000\n"
               "see also https://h.example/x?token=t0k")
    shown = redact(message)
    assert not [s for s in ("p@ss", "ss@db", "hunter2", ":pw@", "t0k") if s in shown], shown
    assert "postgresql://u:***@db.example:5432/optuna?sslmode=require&password=***'" in shown
    assert "http://alice:***@127.0.0.1:5000" in shown and "token=***" in shown


@pytest.mark.parametrize("text", [
    "sqlite:///tmp/optuna.db", "http://127.0.0.1:5000", "http://host:8080/a@b", "mysql://u@h/db",
    "trial 3: keys=4 monkey=2 sparsity=0.5", "journal:///tmp/j.log", "", "file:///x?y=1",
])
def test_redact_leaves_text_without_secrets_alone(text):
    assert redact(text) == text


def _leaks(root: Path, secrets: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found += [f"{path}: {s!r}" for s in secrets if s in data]
    return found


@pytest.mark.slow
def test_credentials_in_urls_never_leak(tmp_path, fast_profile_path, monkeypatch, capsys):
    """The command, run in this process on the session's warm Ray, whose logs are searched
    too."""
    import ray

    from search.cli import main

    port = free_port()
    server_root = tmp_path / "server"
    server = start_mlflow_server(server_root, port)
    context = ray.get_runtime_context()
    ray_logs = Path(context.get_temp_dir()) / context.get_session_name()
    work = tmp_path / "work"
    work.mkdir()
    (work / "quick.yaml").write_text(SPACE)
    monkeypatch.chdir(work)
    db = work / "optuna.db"
    tracking = f"http://alice:{TRACKING_SECRET}@127.0.0.1:{port}"
    storage = f"sqlite+pw://bob:{STORAGE_SECRET}@dbhost/{db}"
    try:
        capsys.readouterr()
        code = main(["--profile", str(fast_profile_path), "--budget", "2", "--space",
                     "quick.yaml", "--study-name", "secret", "--tracking-uri", tracking,
                     "--storage", storage, "--quiet"])
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        assert "alice:***@127.0.0.1" in out.out  # the server is named, redacted
        study = optuna.load_study(study_name="secret", storage=f"sqlite:///{db}")
        assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2

        client = MlflowClient(f"http://127.0.0.1:{port}")
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 3
        logged = []
        for run in runs:
            logged += [f"{k}={v}" for k, v in run.data.params.items()]
            logged += [f"{k}={v}" for k, v in run.data.tags.items()]
            logged.append(run.info.artifact_uri or "")
            client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded"
                                                                / run.info.run_id))
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        assert parent.data.params["storage"] == f"sqlite+pw://bob:***@dbhost/{db}"
        assert list((tmp_path / "downloaded").rglob("pareto.csv"))

        secrets = [TRACKING_SECRET, STORAGE_SECRET]
        secrets += [base64.b64encode(f"{u}:{s}".encode()).decode()
                    for u, s in (("alice", TRACKING_SECRET), ("bob", STORAGE_SECRET))]
        for text, where in ((out.out, "stdout"), (out.err, "stderr"),
                            ("\n".join(logged), "MLflow params/tags")):
            assert not [s for s in secrets if s in text], where
        stop_mlflow_server(server)
        leaks = [_leaks(root, [s.encode() for s in secrets])
                 for root in (work, tmp_path / "downloaded", server_root, ray_logs)]
        assert leaks == [[], [], [], []]
        assert list(ray_logs.rglob("*.log")), f"Ray wrote no logs in {ray_logs}"
    finally:
        stop_mlflow_server(server)
