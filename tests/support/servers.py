"""A real MLflow tracking server for the tests, on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port whose runs and artifacts live under ``root``
    (a SQLite store, so they survive a restart on the same root and port).

    A new store starts from the migrated empty one the search itself uses for new stores
    (seconds of schema migrations saved), and the server runs without MLflow 3's job
    runner (eight more Python processes that import MLflow, for jobs a study never runs)."""
    import os

    from search.results._mlflow_store import seed_sqlite_store

    root.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{root / 'mlflow.db'}"
    seed_sqlite_store(store)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", store,
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "a"), text=True,
        start_new_session=True,  # its own process group: stop_mlflow_server ends its workers too
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail("mlflow server exited: " + (root / "server.log").read_text()[-2000:])
    proc.kill()
    pytest.fail("mlflow server did not start")


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """Kill a server from start_mlflow_server with its workers, as a crash would."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
