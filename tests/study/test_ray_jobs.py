"""A scheduled cluster run for real: a Ray head on loopback with token authentication, the
study submitted through the Ray Jobs API with journal-file storage, as experiments/ holds
for nightly runs. (That a rerun of the command resumes the journal's study is tested in
tests/study/test_run.py: a second submission here would run the same code again, at 20 s of
job and driver start-up.)"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from search.results.tracking import EXPERIMENT
from search.study.storage import open_storage
from tests.support.helpers import QUICK_SPACE
from tests.support.servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]  # a Ray of its own, started as a user would
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def head(tmp_path_factory, fast_profile):
    """A Ray head on 127.0.0.1 that requires a token and advertises the fast profile's device.

    Started with ``--block`` in a process group of its own and stopped by ending that group:
    ``ray stop`` would also stop every other Ray of this user on the machine.
    """
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(24),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard, agent = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    # a temporary directory of its own (short: Ray's socket paths): a job's driver joins the
    # cluster named in <temp-dir>/ray_current_cluster, which any other Ray started on this
    # machine meanwhile (another test's) would rewrite in the shared /tmp/ray
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--temp-dir", str(temp),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
         # the job agent's default port (52365) may be held by another Ray on this machine
         "--dashboard-agent-listen-port", str(agent),
         "--resources", json.dumps({fast_profile.resource: 1}), "--disable-usage-stats"],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        cwd=log.parent)  # the jobs' working directory: MLflow's ./mlruns lands there
    try:
        _wait_for(dashboard, proc, log)
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("ray start exited: " + log.read_text()[-3000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            time.sleep(1)
    pytest.fail("the Ray head's dashboard did not open: " + log.read_text()[-3000:])


def _stop_group(proc: subprocess.Popen) -> None:
    """End the head and every process it started, and check none is left behind (a short
    graceful stop first: the test needs the processes gone, not a clean shutdown)."""
    for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(2)
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    if left.stdout.strip():
        os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(2)
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    assert not left.stdout.strip(), f"Ray processes left behind: {left.stdout.split()}"


def _submit(env: dict[str, str], address: str, *args: str) -> subprocess.CompletedProcess:
    """``ray job submit`` and wait for the job; retried while the head's job agent starts."""
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run([RAY, "job", "submit", "--address", address, "--", sys.executable,
                              "-m", "search.cli", *args], env=env, capture_output=True,
                             text=True, timeout=900)
        if "No available agent" not in out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(3)


def test_a_nightly_style_job_runs_on_a_token_protected_cluster(head, tmp_path,
                                                              fast_profile_path):
    env, address = head
    space = tmp_path / "quick.yaml"
    space.write_text(QUICK_SPACE)
    journal = tmp_path / "nightly.journal"
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({
        "profile": str(fast_profile_path), "budget": 3, "study_name": "nightly",
        "ray_address": "auto", "storage": f"journal:///{journal}", "latency": "measure",
        "output_dir": str(tmp_path / "out"), "space": str(space), "refine": 0,
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))

    first = _submit(env, address, "--config", str(config))
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "succeeded" in (first.stdout + first.stderr)
    without_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    refused = _submit({**without_token, "RAY_AUTH_TOKEN": "wrong"}, address, "--config",
                      str(config))
    assert refused.returncode != 0, refused.stdout  # token authentication is on
    assert any(w in refused.stderr.lower() for w in ("401", "unauthori", "token")), \
        refused.stderr[-2000:]

    study = optuna.load_study(study_name="nightly", storage=open_storage(f"journal:///{journal}"))
    done = [t for t in study.trials if t.state.is_finished()]
    assert [t.number for t in done] == [0, 1, 2]  # the budget met exactly
    assert {t.user_attrs.get("latency_source") for t in done if t.values} == {"measured"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string="tags.`search.study.run` = 'nightly'")
    assert len(parents) == 1
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(int(c.data.tags["search.trial"]) for c in children) == [0, 1, 2]
