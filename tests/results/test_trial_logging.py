"""MLflow catch-up with no Ray and no server: trials the driver finished but never logged
(a tracking outage, a crash) are logged later, once each."""

from __future__ import annotations

import optuna

from search.results.tracking import _TRIAL_TAG, Tracker
from search.results.trial_logging import MlflowTrialLogger
from tests.support.driver import ONE_SHOT_TWO_MODELS, run_driver


def _children(tracker: Tracker) -> dict[int, list[str]]:
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_id}'")
    found: dict[int, list[str]] = {}
    for run in runs:
        found.setdefault(int(run.data.tags[_TRIAL_TAG]), []).append(run.info.status)
    return found


def test_catch_up_logs_each_missed_trial_once_and_completes_a_cut_off_child(task, tmp_path):
    study, _ = run_driver(task, tmp_path, ONE_SHOT_TWO_MODELS, budget=3)  # driver logged nothing
    failed = study.ask()  # a trial that failed, as a dead driver's stale trial ends
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "s", tmp_path / "artifacts")
    # a child the server created but whose logging was cut off (still RUNNING, no metrics)
    tracker.client.create_run(tracker.experiment_id, run_name="trial-0",
                              tags={"mlflow.parentRunId": tracker.parent_id, _TRIAL_TAG: "0"})

    MlflowTrialLogger(Tracker(uri, "s", tmp_path / "artifacts")).catch_up(study)
    finished = [t for t in study.get_trials() if t.state.is_finished()]
    children = _children(tracker)
    assert sorted(children) == sorted(t.number for t in finished)
    assert all(len(statuses) == 1 for statuses in children.values())  # none duplicated
    assert children[0] == ["FINISHED"] and children[failed.number] == ["FAILED"]

    MlflowTrialLogger(Tracker(uri, "s", tmp_path / "artifacts")).catch_up(study)  # a rerun
    assert _children(tracker) == children
    run = tracker.client.search_runs([tracker.experiment_id],
                                     filter_string=f"tags.`{_TRIAL_TAG}` = '1'")[0]
    assert run.data.metrics["accuracy"] == study.trials[1].values[0]
