"""Which front members a refinement spends its epochs on."""

from __future__ import annotations

import optuna

from search.refine import RefineSettings, _candidates


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
    assert [t.number for t in _candidates(study, RefineSettings(members=4))] == [4, 6, 3, 5]
    assert [t.number for t in _candidates(study, RefineSettings(members=2))] == [4, 6]
