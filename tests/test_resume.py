"""Interrupt a study with Ctrl-C (SIGINT), rerun the same command: nothing lost, nothing doubled."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import QUICK_SPACE

pytestmark = pytest.mark.slow

# the quick space with an optional one-epoch fine-tune, so trials vary in length
SPACE = QUICK_SPACE.replace("epochs: {low: 0, high: 0}", "epochs: {low: 0, high: 1}")
assert SPACE != QUICK_SPACE


def test_sigint_then_rerun_ends_with_exactly_the_budget(tmp_path, fast_profile_path):
    (tmp_path / "quick.yaml").write_text(SPACE)
    cmd = [sys.executable, "-m", "search.cli", "--profile", str(fast_profile_path), "--budget",
           "5", "--space", "quick.yaml", "--study-name", "resume", "--quiet",
           "--grace-period", "20", "--refine", "0"]
    storage = f"sqlite:///{tmp_path / 'search-runs' / 'optuna.db'}"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def complete() -> list[optuna.trial.FrozenTrial]:
        from sqlalchemy.exc import OperationalError

        try:  # [] until the driver has created the study, or while SQLite is locked a moment
            study = optuna.load_study(study_name="resume", storage=storage)
        except (KeyError, OperationalError):
            return []
        # what the budget counts: COMPLETE, or stopped early for not reaching the front
        return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                        optuna.trial.TrialState.PRUNED))

    deadline = time.monotonic() + 300
    while len(complete()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Rerun the same command" in err
    before = {t.number: (t.values, t.params) for t in complete()}
    assert 2 <= len(before) < 5

    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = complete()
    assert len(after) == 5
    for t in after:  # completed results unchanged
        if t.number in before:
            assert (t.values, t.params) == before[t.number]

    client = MlflowClient(f"sqlite:///{tmp_path / 'search-runs' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert experiments, "the study logged nothing to MLflow"
    runs = client.search_runs(experiments)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    complete_numbers = sorted(t.number for t in after)
    logged = sorted(int(r.data.tags["search.trial"]) for r in children
                    if r.data.tags.get("state") in ("COMPLETE", "PRUNED"))
    assert logged == complete_numbers  # one child per finished trial, none doubled
    numbers = [int(r.data.tags["search.trial"]) for r in children]
    assert len(numbers) == len(set(numbers))
