"""Which front members a refinement spends its epochs on."""

from __future__ import annotations

import logging
from dataclasses import replace

import optuna
import pytest

from search._base.records import TrialRecord
from search.config import SearchConfig
from search.study.refine import _candidates, _reached_reference, refine_front


def _config(output_dir) -> SearchConfig:  # noqa: ANN001
    return SearchConfig(profile="cpu-avx512-vnni", budget=1, output_dir=output_dir, refine=4)


def _add(study: optuna.Study, accuracy: float, latency_ms: float, **attrs) -> None:
    study.add_trial(optuna.trial.create_trial(
        values=[accuracy, latency_ms], user_attrs={"choices": {"epochs": 1}, **attrs},
        distributions={}, params={}))


def test_only_members_with_accuracy_to_buy_back_are_refined():
    study = optuna.create_study(directions=["maximize", "minimize"])
    _add(study, 99.2, 1.0, baseline="fp32", reference=True)
    _add(study, 98.9, 0.4, baseline="int8")
    _add(study, 99.4, 0.5)  # on the front, already above fp32: nothing to buy back
    _add(study, 98.0, 0.2)  # on the front, a point below
    _add(study, 95.0, 0.1)  # on the front, four points below
    _add(study, 85.0, 0.05)  # on the front, below the box: a longer fine-tune may lift it
    _add(study, 20.0, 0.04)  # on the front, further below
    _add(study, 97.0, 0.3)  # dominated by trial 3
    _add(study, 96.0, 0.15, refined_from=2)  # on the front, but a refinement is not refined again
    # in the box and below it take turns, each fastest first
    assert [t.number for t in _candidates(study)] == [4, 6, 3, 5]


def test_members_slower_than_a_trial_as_accurate_as_fp32_are_not_refined():
    study = optuna.create_study(directions=["maximize", "minimize"])
    _add(study, 99.2, 1.0, baseline="fp32", reference=True)
    _add(study, 97.0, 0.2)
    _add(study, 98.0, 0.3)
    assert _reached_reference(study, 0.3) is None  # nothing faster is as accurate as fp32
    _add(study, 99.2, 0.2, refined_from=1)  # trial 1's refinement reached fp32's accuracy
    assert _reached_reference(study, 0.3) == 3
    assert _reached_reference(study, 0.2) == 3
    assert _reached_reference(study, 0.1) is None


class _Finetunes:
    """Runs no model: answers each refinement with the accuracy given for its trial, so the
    test sees which members :func:`refine_front` spends a fine-tune on, and in which order."""

    predicts = True

    def __init__(self, reached: dict[int, float]) -> None:
        self.reached, self.submitted = reached, []

    def submit_finetune(self, record: TrialRecord) -> int:
        self.submitted.append(record.number)
        self.done = replace(record, accuracy=self.reached[record.number], onnx_model=b"onnx")
        return record.number

    @staticmethod
    def wait(handles: list, timeout: float | None) -> list:  # noqa: ARG004
        return handles[:1]

    def result(self, handle: int) -> TrialRecord:  # noqa: ARG002
        return self.done


def test_refinement_stops_at_members_a_refined_one_already_beats(tmp_path, caplog):
    study = optuna.create_study(directions=["maximize", "minimize"])
    _add(study, 99.2, 1.0, baseline="fp32", reference=True)
    _add(study, 96.0, 0.2)  # the fastest: refined first, reaches fp32's accuracy
    _add(study, 98.0, 0.3)  # slower: could at best tie trial 1's refinement
    _add(study, 98.5, 0.4)
    (tmp_path / "models").mkdir()
    executor = _Finetunes({1: 99.2, 2: 99.2, 3: 99.2})
    logger = logging.getLogger("search")  # a CLI test may have stopped it propagating
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="search"):
            added = refine_front(study, executor, _config(tmp_path))
    finally:
        logger.removeHandler(caplog.handler)
    assert executor.submitted == [1] and added == [4]
    assert "trial 2 not refined" in caplog.text and "time bound" not in caplog.text
    assert study.trials[4].user_attrs["refined_from"] == 1

    # had it stayed short of fp32, the slower members would be refined in turn
    study = optuna.create_study(directions=["maximize", "minimize"])
    _add(study, 99.2, 1.0, baseline="fp32", reference=True)
    _add(study, 96.0, 0.2)
    _add(study, 98.0, 0.3)
    executor = _Finetunes({1: 98.5, 2: 99.2})
    refine_front(study, executor, _config(tmp_path))
    assert executor.submitted == [1, 2]


def _add_stopped(study: optuna.Study, latency_ms: float) -> None:
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED, distributions={}, params={},
        user_attrs={"choices": {"epochs": 3}, "latency_ms": latency_ms}))


def test_trials_stopped_early_faster_than_the_box_are_refined_too(tmp_path):
    """A stopped fine-tune's accuracy after an epoch says little of what 12 epochs reach,
    and its latency is final: one faster than every trial within 10 points of fp32 takes a
    refinement turn after the box's and the fast members', and is added if it gets there."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    _add(study, 99.2, 1.0, baseline="fp32", reference=True)
    _add(study, 98.0, 0.3)  # in the box
    _add(study, 60.0, 0.25)  # below the box
    _add_stopped(study, 0.1)  # faster than anything in the box
    _add_stopped(study, 0.4)  # slower than the box's fastest: it would end dominated
    study.set_user_attr("max_accuracy_drop", None)
    study.set_user_attr("max_latency_ms", 0.5)
    assert [t.number for t in _candidates(study)] == [1, 2, 3]
    (tmp_path / "models").mkdir()
    executor = _Finetunes({1: 98.5, 2: 90.0, 3: 99.0})
    added = refine_front(study, executor, _config(tmp_path))
    assert executor.submitted == [1, 2, 3] and len(added) == 3
    refined = study.trials[added[-1]]
    assert refined.user_attrs["refined_from"] == 3
    assert refined.values == [99.0, 0.1]
    assert refined.user_attrs["screened_accuracy"] is None
    assert refined.user_attrs["constraint_values"] == pytest.approx([0.1 - 0.5])


def test_a_member_skipped_as_beaten_leaves_its_slot_to_the_next(tmp_path):
    """``members`` counts refinements, not candidates looked at: a member skipped because a
    refined one already beats it does not keep a faster stopped trial from its turn (which
    a rerun of the finished study would otherwise give it, changing the front)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    _add(study, 99.2, 1.0, baseline="fp32", reference=True)
    _add(study, 97.0, 0.2)  # in the box, fastest: refined first, reaches fp32's accuracy
    _add(study, 98.0, 0.3)  # in the box, slower: then beaten, skipped
    _add(study, 80.0, 0.1)  # below the box
    _add_stopped(study, 0.05)
    _add_stopped(study, 0.06)
    study.set_user_attr("max_accuracy_drop", None)
    study.set_user_attr("max_latency_ms", None)
    assert [t.number for t in _candidates(study)] == [1, 3, 4, 2, 5]
    (tmp_path / "models").mkdir()
    executor = _Finetunes({1: 99.2, 3: 85.0, 4: 98.5, 5: 98.0})
    refine_front(study, executor, _config(tmp_path))
    assert executor.submitted == [1, 3, 4, 5]
    executor = _Finetunes({})
    assert refine_front(study, executor, _config(tmp_path)) == []
    assert executor.submitted == []  # a rerun has nothing left to refine


def test_trials_stopped_beyond_the_latency_limit_are_not_refined():
    study = optuna.create_study(directions=["maximize", "minimize"])
    _add(study, 99.2, 1.0, baseline="fp32", reference=True)
    _add(study, 98.0, 0.6)  # the only trial within 10 points: over the limit
    _add_stopped(study, 0.45)  # faster than it, but over the limit too: a refinement keeps it
    _add_stopped(study, 0.3)
    study.set_user_attr("max_accuracy_drop", None)
    study.set_user_attr("max_latency_ms", 0.4)
    assert 2 not in [t.number for t in _candidates(study)]
    assert 3 in [t.number for t in _candidates(study)]
