"""What happens when a trial finishes, as callbacks of the driver's loop: its MLflow child run
and the front's hypervolume so far.

Shaped like ``Study.optimize(callbacks=...)``: ``callback(study, frozen_trial)``.
Every value comes from what the Optuna storage holds, so a trial missed
during a tracking-server outage (or before a crash) is logged later from the
same place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import optuna
import pandas as pd

from search._base.attrs import TrialKey, failure_reason, reference_accuracy
from search._base.net import server_reachable
from search._base.redact import redact
from search.results.pareto import hypervolume, trials_frame
from search.results.tracking import Tracker

__all__ = ["MlflowTrialLogger", "log_frozen"]

log = logging.getLogger("search")
# user attributes logged as metrics of the same name
_TRIAL_METRICS = (TrialKey.TEST_ACCURACY, TrialKey.LATENCY_P90_MS, TrialKey.LATENCY_CV,
                  TrialKey.SIZE_MB, TrialKey.SPARSITY, TrialKey.MACS, TrialKey.PARAMS)


def log_frozen(tracker: Tracker, trial: optuna.trial.FrozenTrial,
               reference: float | None = None) -> None:
    """Log a finished trial (COMPLETE, PRUNED or FAIL) as a child run."""
    a = trial.user_attrs
    state = trial.state
    complete = state == optuna.trial.TrialState.COMPLETE
    metrics: dict[str, float | None] = {}
    if complete:
        metrics = {"accuracy": trial.values[0], "latency_median_ms": trial.values[1]}
        if reference is not None:
            metrics["accuracy_drop"] = reference - trial.values[0]
        metrics.update({k: a.get(k) for k in _TRIAL_METRICS if k in a})
        precisions = list(a.get(TrialKey.LAYER_PRECISIONS, {}).values())
        for p in sorted(set(precisions)):
            metrics[f"share_{p}"] = precisions.count(p) / len(precisions)
    elif state == optuna.trial.TrialState.PRUNED:
        metrics = {"latency_median_ms": a.get(TrialKey.LATENCY_MS)}
        metrics.update({k: a.get(k) for k in _TRIAL_METRICS if k in a})
        for i, acc in enumerate(a.get(TrialKey.EPOCH_ACCURACY, [])):
            metrics[f"epoch_{i + 1}_accuracy"] = acc
    metrics.update({f"time_{k}_s": v for k, v in a.get(TrialKey.TIMINGS, {}).items()})
    tags = {
        "state": state.name,
        "latency_source": a.get(TrialKey.LATENCY_SOURCE, ""),
        "device": a.get(TrialKey.DEVICE, ""),
        "baseline": a.get(TrialKey.BASELINE, ""),
        "metric": tracker.metric,  # what "accuracy" holds: top-1, mAP, mIoU, ...
    }
    if complete:
        tags["latency_noisy"] = str(bool(a.get(TrialKey.LATENCY_NOISY, False))).lower()
    if state == optuna.trial.TrialState.FAIL:
        tags["failure_reason"] = failure_reason(trial)
        tags["failure_stage"] = tags["failure_reason"].partition(":")[0]
    if TrialKey.PRUNED_REASON in a:
        tags["pruned_reason"] = a[TrialKey.PRUNED_REASON]
    for key in (TrialKey.CACHED_FROM, TrialKey.REFINED_FROM, TrialKey.SEED_CONFIG):
        if key in a:
            tags[key] = str(a[key])
    params = a.get(TrialKey.CHOICES) or dict(trial.params)
    tracker.log_trial(trial.number, params, metrics, tags,
                      failed=state == optuna.trial.TrialState.FAIL)


class MlflowTrialLogger:
    """One child run per finished trial, and the hypervolume history of the parent.

    When the tracking server is down the study goes on (every result is in the
    Optuna storage) and the missed trials are logged once it is back, at the
    end, or on a rerun (:meth:`catch_up`).
    """

    def __init__(self, tracker: Tracker,
                 frame: Callable[[optuna.Study], pd.DataFrame] = trials_frame) -> None:
        self.tracker = tracker
        self.frame = frame  # the trials table; the driver shares the one it keeps per trial
        self.behind = False  # some trial could not be logged yet
        self.seconds = 0.0  # time spent logging

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        start = time.perf_counter()
        try:
            if not server_reachable(self.tracker.uri):  # fast: no MLflow retries
                if not self.behind:
                    log.warning("MLflow tracking server %s is unreachable; trials are logged "
                                "when it is back, at the end, or on a rerun",
                                redact(self.tracker.uri))
                self.behind = True
                return
            if self.behind:
                self.catch_up(study)
                log.info("MLflow tracking server is back; missed trials logged")
                self.behind = False
            else:
                log_frozen(self.tracker, trial, reference_accuracy(study))
            if trial.state == optuna.trial.TrialState.COMPLETE:
                self._log_hypervolume(study, trial.number)
        except Exception as exc:
            self.behind = True
            log.warning("MLflow logging of trial %d failed (%s); it will be logged later",
                        trial.number, type(exc).__name__)
        finally:
            self.seconds += time.perf_counter() - start

    def _log_hypervolume(self, study: optuna.Study, step: int) -> None:
        try:
            hv = hypervolume(self.frame(study))
        except Exception as exc:  # a front that cannot be scored yet
            log.debug("hypervolume not logged: %s", exc)
            return
        self.tracker.log_summary_metrics({"hypervolume": hv}, step=step)

    def catch_up(self, study: optuna.Study) -> None:
        """Log every finished trial MLflow lacks (missed during an outage or before a crash)."""
        self.tracker.refresh()
        reference = reference_accuracy(study)
        for t in study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in self.tracker.logged:
                log_frozen(self.tracker, t, reference)
