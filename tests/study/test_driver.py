"""The driver's logic with no Ray and no subprocess: in-memory Optuna, stages run in-process."""

from __future__ import annotations

import optuna
import pytest

from search._base.attrs import fail_stale, failure_reason, n_done
from search.config import SearchConfig
from search.study.run import run_search
from tests.support.driver import ONE_SHOT_TWO_MODELS, run_driver, search_space


def test_repeated_choices_are_answered_from_the_cache_and_count_once_each(task, tmp_path):
    study, seen = run_driver(task, tmp_path, ONE_SHOT_TWO_MODELS, budget=5)
    assert n_done(study) == 5 and seen == [0, 1, 2, 3, 4]  # every trial reached the callbacks
    cached = [t for t in study.trials if "cached_from" in t.user_attrs]
    assert len(cached) == 3 and {t.user_attrs["cached_from"] for t in cached} <= {0, 1}
    for t in cached:
        origin = study.trials[t.user_attrs["cached_from"]]
        assert t.values == origin.values and t.user_attrs["choices"] == origin.user_attrs["choices"]
        assert (tmp_path / "models" / f"trial-{t.number}.onnx").exists()


def test_a_time_limit_ends_the_study_early_but_never_before_its_baselines(task, tmp_path, caplog):
    with caplog.at_level("INFO", logger="search"):
        study, _ = run_driver(task, tmp_path, ONE_SHOT_TWO_MODELS, budget=50, time_limit_s=1e-3)
    assert n_done(study) == 2  # fp32 and uniform int8 ran; nothing after the limit started
    assert [t.user_attrs.get("baseline") for t in study.trials] == ["fp32", "int8"]
    assert "time limit (0 s) reached after 2 of 50 trials" in caplog.text


def test_a_constraint_marks_lossy_trials_infeasible(task, tmp_path):
    study, _ = run_driver(task, tmp_path, ONE_SHOT_TWO_MODELS, budget=2, max_accuracy_drop=0.0,
                    max_latency_ms=1e-6)
    for t in study.trials:
        drop, latency = t.user_attrs["constraint_values"]
        assert drop == pytest.approx(t.user_attrs["accuracy_drop"])
        assert latency > 0  # nothing is faster than a nanosecond


HOPELESS = search_space(
    pruning={"structured_ratio": {"low": 0, "high": 0}, "drop_blocks": {"low": 0, "high": 0}},
    distillation={"epochs": {"low": 2, "high": 2}},
    quantization={"precisions": ["fp32"]},
)


def test_resume_counts_pruned_trials_and_fails_what_a_dead_driver_left_running(task, tmp_path):
    study, _ = run_driver(task, tmp_path, HOPELESS, budget=2)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    assert "train" not in study.trials[1].user_attrs["timings"]
    assert n_done(study) == 2
    study.ask()  # a driver died with this trial running
    fail_stale(study)
    assert study.trials[2].state.name == "FAIL"
    assert failure_reason(study.trials[2]) == "driver stopped mid-trial"
    study, _ = run_driver(task, tmp_path, HOPELESS, budget=3, study=study)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL", "PRUNED"]
    assert n_done(study) == 3


def test_without_early_stopping_every_trial_is_fine_tuned(task, tmp_path):
    space = HOPELESS.model_copy(update={"distillation": HOPELESS.distillation.model_copy(
        update={"epochs": HOPELESS.distillation.epochs.model_copy(update={"low": 1, "high": 1})})})
    study, _ = run_driver(task, tmp_path, space, budget=2, early_stopping=False)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert "train" in study.trials[1].user_attrs["timings"]


@pytest.mark.slow
def test_parallel_two_on_one_node_runs_trials_together(tmp_path, fast_profile_path, quick_space):
    """--parallel 2 on a private one-node Ray: two trials are RUNNING at once (their
    start..complete intervals overlap), and the budget is met with no trial doubled."""
    result = run_search(SearchConfig(profile=str(fast_profile_path), budget=3, runs_root=tmp_path,
                                     space=quick_space, study_name="two", latency="predict",
                                     parallel=2, refine=0), show_progress=False)
    assert sorted(result.trials["trial"]) == [0, 1, 2]
    study = optuna.load_study(study_name="two",
                              storage=f"sqlite:///{(tmp_path / 'optuna.db').resolve()}")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 3 == len(study.trials)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in done)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)), \
        spans


def test_a_study_whose_trials_all_fail_stops_at_the_default_limit(task, tmp_path, monkeypatch):
    """Every trial raises on entering its first stage (search/_base/faults.py, in this process):
    the study stops after max(10, budget) failures, each recorded with its stage."""
    from search._base.errors import SearchError

    monkeypatch.setenv("SEARCH_FAULTS", "prune@*")
    study = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.raises(SearchError, match="^10 trials failed; stopping"):
        run_driver(task, tmp_path, ONE_SHOT_TWO_MODELS, budget=4, study=study)
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == len(study.trials) == 10
    assert all(failure_reason(t).startswith("prune: InjectedFault") for t in failed)
    limits = [SearchConfig(profile="host", budget=b, max_failures=m).failure_limit
              for b, m in ((4, None), (30, None), (30, 3))]
    assert limits == [10, 30, 3]


def _frame(rows: list[tuple[float, float, int]]):
    """A trials frame of (accuracy, latency ms, epochs) rows, as trials_frame builds it."""
    import pandas as pd

    return pd.DataFrame({"accuracy": [r[0] for r in rows], "latency_ms": [r[1] for r in rows],
                         "param.epochs": [r[2] for r in rows], "baseline": "",
                         "refined_from": None, "cached_from": None, "feasible": True})


def test_a_fine_tune_is_expected_to_reach_what_fine_tunes_at_least_as_slow_typically_reach():
    from search.study.driver import fine_tune_prospect

    assert fine_tune_prospect(_frame([])[:0], 1.0) == (None, None, "")
    # fewer than three fine-tunes at least as slow: the best accuracy so far
    few = _frame([(99.0, 1.0, 0), (97.0, 0.5, 2), (60.0, 0.2, 1)])
    assert fine_tune_prospect(few, 0.4)[:2] == (60.0, 99.0)
    # three or more: their median; faster fine-tunes and one-shot trials do not count
    many = _frame([(99.0, 1.0, 0), (98.0, 0.6, 2), (95.0, 0.5, 2), (90.0, 0.45, 3),
                   (70.0, 0.1, 2), (99.5, 0.05, 0)])
    needed, expected, why = fine_tune_prospect(many, 0.4)
    assert (needed, expected) == (99.5, 95.0) and "median of the 3" in why
    # a slower trial has fewer fine-tunes at least as slow than it: back to the best so far
    assert fine_tune_prospect(many, 0.55)[1] == 99.5
