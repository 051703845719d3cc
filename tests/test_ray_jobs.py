"""A scheduled cluster run for real: a Ray head on loopback with token authentication, the
study submitted twice through the Ray Jobs API with journal-file storage; the second
submission resumes the first."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from search.study import open_storage
from search.tracking import EXPERIMENT
from tests.conftest import QUICK_SPACE, free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def head(tmp_path_factory, fast_profile):
    """A Ray head on 127.0.0.1 that requires a token and advertises the fast profile's device;
    stopped (with every process it started) at the end."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(24),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    started = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
         "--resources", json.dumps({fast_profile.resource: 1}), "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop"], env=env, capture_output=True, timeout=120)


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


def test_a_nightly_style_job_runs_and_a_second_submission_resumes_it(head, tmp_path,
                                                                      fast_profile_path):
    env, address = head
    space = tmp_path / "quick.yaml"
    space.write_text(QUICK_SPACE)
    journal = tmp_path / "nightly.journal"
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({
        "profile": str(fast_profile_path), "budget": 2, "study_name": "nightly",
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

    second = _submit(env, address, "--config", str(config), "--budget", "3")
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]

    study = optuna.load_study(study_name="nightly", storage=open_storage(f"journal:///{journal}"))
    done = [t for t in study.trials if t.state.is_finished()]
    assert [t.number for t in done] == [0, 1, 2]  # the budget met exactly, nothing repeated
    assert {t.user_attrs.get("latency_source") for t in done if t.values} == {"measured"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string="tags.`search.study` = 'nightly'")
    assert len(parents) == 1
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(int(c.data.tags["search.trial"]) for c in children) == [0, 1, 2]
