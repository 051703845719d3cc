"""Faults during a study: a trial that raises, a device node that dies."""

from __future__ import annotations

import subprocess
import sys
import time

import optuna
import pytest
from ray.cluster_utils import Cluster

from search._base.errors import ConfigError, SearchError
from search.config import SearchConfig
from search.study.run import run_search
from tests.support.helpers import QUICK_SPACE

pytestmark = pytest.mark.slow


def _complete(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials the budget counts (COMPLETE, or PRUNED by early stopping once its
    latency showed it could not reach the front); raises when the study is not there."""
    study = optuna.load_study(study_name=name, storage=storage)
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                    optuna.trial.TrialState.PRUNED))


def _complete_so_far(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """For polling while a driver starts: [] until the study exists, while SQLite is
    locked for a moment or while the driver creates its tables; any other error raises."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    try:
        return _complete(storage, name)
    except (KeyError, OperationalError, IntegrityError):
        return []


def test_losing_the_device_node_mid_study_keeps_the_full_budget(tmp_path, fast_profile,
                                                                 fast_profile_path, monkeypatch):
    """The study runs as a separate driver (the CLI) joined to a local multi-node cluster;
    the node that holds the device is killed after two trials and a new one joins. Trials
    are quick (no fine-tune) but slowed by 1 s (the fault hook, which the driver sends
    with each task), so that the loss lands mid-study."""
    monkeypatch.setenv("SEARCH_FAULTS", "prune@*+1")
    (tmp_path / "quick.yaml").write_text(QUICK_SPACE)
    cluster = Cluster(initialize_head=True,  # no dashboard: a dozen processes it never uses
                      # a lost node is declared dead after 1.5 s, not Ray's default 15 s or so
                      head_node_args={"num_cpus": 2, "include_dashboard": False,
                                      "_system_config": {"health_check_period_ms": 500,
                                                         "health_check_failure_threshold": 3}})
    first = cluster.add_node(num_cpus=1, resources={fast_profile.resource: 1})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "search.cli", "--profile", str(fast_profile_path), "--budget",
           "4", "--storage", storage, "--study-name", "chaos", "--ray-address", cluster.address,
           "--space", "quick.yaml", "--refine", "0", "--quiet"]
    try:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while len(_complete_so_far(storage, "chaos")) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.3)
        cluster.remove_node(first, allow_graceful=False)
        time.sleep(2)
        second = cluster.add_node(num_cpus=1, resources={fast_profile.resource: 1})
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        trials = _complete(storage, "chaos")
        assert len(trials) == 4  # two before the loss, two on the new node
        nodes = {t.user_attrs.get("node") for t in trials}
        assert first.node_id in nodes and second.node_id in nodes
        assert None not in nodes  # every trial says where it was measured
    finally:
        cluster.shutdown()


def test_parallel_beyond_the_cluster_is_refused(tmp_path, fast_profile_path):
    config = SearchConfig(profile=str(fast_profile_path), budget=2, runs_root=tmp_path,
                          parallel=64, study_name="too-wide")
    with pytest.raises(ConfigError, match="--parallel 64 can never be scheduled"):
        run_search(config, show_progress=False)


def test_failing_trials_are_recorded_and_the_study_goes_on(tmp_path, fast_profile_path):
    """A learning rate that makes every fine-tune diverge: those trials FAIL with the reason."""
    space = tmp_path / "diverge.yaml"
    space.write_text("distillation:\n  epochs: {low: 1, high: 1}\n"
                     "  lr: {low: 1.0e+6, high: 1.0e+7, log: true}\n  alpha: {low: 0, high: 0}\n"
                     # nothing pruned: each trial reaches its diverging fine-tune at once
                     "pruning:\n  structured_ratio: {low: 0, high: 0}\n"
                     "  drop_blocks: {low: 0, high: 0}\n")
    # the two baselines (no fine-tune) complete; every trial after them diverges (none is
    # stopped first for being unable to reach the front); the default limit (10 failures at
    # this budget) is checked in tests/study/test_driver.py
    config = SearchConfig(profile=str(fast_profile_path), budget=4, runs_root=tmp_path,
                          space=str(space), study_name="diverge", early_stopping=False, refine=0,
                          max_failures=3)
    with pytest.raises(SearchError, match="3 trials failed; stopping") as raised:
        run_search(config, show_progress=False)
    assert type(raised.value) is SearchError  # the study gave up, not bad input
    study = optuna.load_study(study_name="diverge",
                              storage=f"sqlite:///{(tmp_path / 'optuna.db').resolve()}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 3
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2
    assert all(t.user_attrs["failure"].startswith("fine-tune") for t in failed)
    import pandas as pd

    trials = pd.read_csv(tmp_path / "diverge" / "trials.csv")
    assert (trials["state"] == "FAIL").sum() == len(failed)


# the stages of a trial without fine-tune (the quick space's); a failing fine-tune ("train")
# is the diverging study's subject above
STAGES = ("prune", "export", "quantize", "evaluate", "measure")


def test_a_fault_in_each_stage_fails_that_trial_and_the_study_goes_on(tmp_path, monkeypatch,
                                                                      fast_profile_path):
    """SEARCH_FAULTS makes trials 2..7 raise on entering one stage each (search/_base/faults.py)."""
    faults = {stage: 2 + i for i, stage in enumerate(STAGES)}
    monkeypatch.setenv("SEARCH_FAULTS", ",".join(f"{s}@{n}" for s, n in faults.items()))
    (tmp_path / "quick.yaml").write_text(QUICK_SPACE)
    config = SearchConfig(profile=str(fast_profile_path), budget=3, runs_root=tmp_path,
                          space=str(tmp_path / "quick.yaml"), study_name="faulty", parallel=1,
                          refine=0)
    result = run_search(config, show_progress=False)
    from search.profiles import load_profile, measurable_here

    if not measurable_here(load_profile(fast_profile_path))[0]:  # predicted: no measure stage
        faults.pop("measure")
    assert len(result.trials) == 3 and result.n_failed == len(faults)
    study = optuna.load_study(study_name="faulty",
                              storage=f"sqlite:///{(tmp_path / 'optuna.db').resolve()}")
    by_number = {t.number: t for t in study.trials}
    for stage, number in faults.items():
        trial = by_number[number]
        assert trial.state == optuna.trial.TrialState.FAIL, stage
        assert trial.user_attrs["failure"].startswith(f"{stage}: InjectedFault"), trial.user_attrs
    import pandas as pd

    rows = pd.read_csv(result.output_dir / "trials.csv")
    failed = rows[rows["state"] == "FAIL"].set_index("trial")["failure"]
    assert {n: failed[n].split(":")[0] for n in faults.values()} == {
        n: s for s, n in faults.items()}
    assert (rows["state"] == "COMPLETE").sum() == 3
    _failed_trials_show_every_choice(rows, tmp_path, faults)


def _failed_trials_show_every_choice(rows, root, faults: dict[str, int]) -> None:
    """A user sees which combination failed: in trials.csv and in its MLflow child run."""
    from mlflow.tracking import MlflowClient

    from search._base.records import Choices

    fail = rows[rows["state"] == "FAIL"].set_index("trial")
    # the choices that shape any model; the rest show where they applied
    names = ["init", "drop_blocks", "structured_ratio", "head_ratio", "epochs"]
    assert set(names) <= set(Choices().applied())
    assert fail[[f"param.{k}" for k in names]].notna().all().all()
    assert fail.filter(like="param.precision.").notna().all().all()
    client = MlflowClient(f"sqlite:///{(root / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("compression-search").experiment_id],
                              filter_string="tags.state = 'FAIL'")
    assert len(runs) == len(faults)
    for run in runs:
        assert set(names) <= set(run.data.params), run.data.params
        assert run.data.tags["failure_stage"] in faults
