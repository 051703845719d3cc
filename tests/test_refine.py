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
    _add(study, 85.0, 0.05)  # on the front, but no one would deploy it
    _add(study, 97.0, 0.3)  # dominated by trial 3
    picked = [t.number for t in _candidates(study, RefineSettings(members=4))]
    assert picked == [4, 3]  # fastest first
    assert [t.number for t in _candidates(study, RefineSettings(members=1))] == [4]
