"""What a study's trials keep in their Optuna user attributes, and how it is read back.

The driver writes them (:func:`record_attrs`, failure and pruning reasons);
trials.csv, MLflow child runs, refinement and resume read them through here.
"""

from __future__ import annotations

from typing import Any

import optuna

from search._base.records import TrialRecord

__all__ = ["COUNTED", "STALE", "fail_stale", "failure_reason", "n_done", "record_attrs",
           "reference_accuracy"]

STALE = "driver stopped mid-trial"  # the reason of a trial a dead driver left RUNNING
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def n_done(study: optuna.Study) -> int:
    """Trials the budget counts: every configuration screened to an end (COMPLETE, or PRUNED
    because it could not reach the front), refinements of front members excluded."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=COUNTED)
               if "refined_from" not in t.user_attrs)


def failure_reason(trial: optuna.trial.FrozenTrial) -> str:
    """Why a FAIL trial failed (a trial left RUNNING by a dead driver has no recorded reason)."""
    return str(trial.user_attrs.get("failure", STALE))


def fail_stale(study: optuna.Study) -> None:
    """Trials left RUNNING by a driver that died are marked FAILED (retried within budget)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def reference_accuracy(study: optuna.Study) -> float | None:
    """Accuracy of the reference trial (trial 0: the least compressed model)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("reference"):
            return float(t.values[0])
    return None


def record_attrs(record: TrialRecord) -> dict[str, Any]:
    """The user attributes a finished trial keeps (everything trials.csv and MLflow show)."""
    lat = record.latency
    attrs: dict[str, Any] = {
        "choices": record.choices.applied(),
        "layer_precisions": record.layer_precisions,
        "timings": record.timings,
        "test_accuracy": record.test_accuracy,
        "size_mb": record.size_mb,
        "sparsity": record.sparsity,
        "macs": record.macs,
        "params": record.params,
        "dropped_blocks": record.dropped_blocks,
    }
    if record.epoch_accuracy:
        attrs["epoch_accuracy"] = record.epoch_accuracy
    if record.node:
        attrs["node"] = record.node
    if lat is not None:
        attrs.update(latency_ms=lat.median_ms, latency_p90_ms=lat.p90_ms, latency_cv=lat.cv,
                     latency_runs=lat.runs, latency_source=lat.source, device=lat.device,
                     provider=lat.provider, latency_noisy=lat.noisy,
                     latency_batch_size=lat.batch_size)
    return attrs
