"""Every key a study keeps in Optuna's user attributes, declared once, and how it is read back.

Trials keep their choices, results and history under :class:`TrialKey`; studies their
settings and after-the-budget state under :class:`StudyKey`. The driver, refinement and the
latency source write them; trials.csv, MLflow child runs, resume and the benchmarks read
them, always through these names (``tests/base/test_attrs.py`` fails on a key spelled
anywhere else).
"""

from __future__ import annotations

from typing import Any

import optuna

from search._base.records import TrialRecord

__all__ = ["COUNTED", "STALE", "StudyKey", "TrialKey", "constraint_values", "fail_stale",
           "failure_reason", "metric_name", "n_constraints", "n_done", "record_attrs", "reference_accuracy"]

STALE = "driver stopped mid-trial"  # the reason of a trial a dead driver left RUNNING
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class TrialKey:
    """Keys of a trial's user attributes."""

    # what the trial chose, and what its model is (record_attrs)
    CHOICES = "choices"  # Choices.applied(): the settings that had an effect
    LAYER_PRECISIONS = "layer_precisions"
    DROPPED_BLOCKS = "dropped_blocks"
    TEST_ACCURACY = "test_accuracy"
    SIZE_MB = "size_mb"
    SPARSITY = "sparsity"
    MACS = "macs"
    PARAMS = "params"
    TIMINGS = "timings"  # seconds per stage
    EPOCH_ACCURACY = "epoch_accuracy"  # validation accuracy after each fine-tune epoch
    # its latency (LatencyStats) and where it was measured
    LATENCY_MS = "latency_ms"
    LATENCY_P90_MS = "latency_p90_ms"
    LATENCY_CV = "latency_cv"
    LATENCY_RUNS = "latency_runs"
    LATENCY_SOURCE = "latency_source"  # measured | predicted
    LATENCY_NOISY = "latency_noisy"
    LATENCY_BATCH_SIZE = "latency_batch_size"
    DEVICE = "device"
    PROVIDER = "provider"
    NODE = "node"  # the Ray node that measured it
    # where it came from
    BASELINE = "baseline"  # enqueued baseline: "fp32" (the reference) or "int8"
    REFERENCE = "reference"  # the baseline speedups and accuracy drops are relative to
    SEED_CONFIG = "seed_config"  # an enqueued starting point's label
    CACHED_FROM = "cached_from"  # answered from an earlier trial with the same choices
    REFINED_FROM = "refined_from"  # a refinement of that front member
    SCREENED_ACCURACY = "screened_accuracy"  # the refined member's accuracy before
    # how it ended
    SCREEN_SECONDS = "screen_seconds"  # what knowing its latency cost, before any fine-tune
    FAILURE = "failure"  # FAIL: "<stage>: <reason>"
    PRUNED_REASON = "pruned_reason"  # PRUNED: why it could not reach the front
    ACCURACY_DROP = "accuracy_drop"  # points below the reference
    CONSTRAINT_VALUES = "constraint_values"  # Optuna's convention: <= 0 is feasible

    # what a refined trial keeps of its source's measurement
    MEASUREMENT = (LATENCY_MS, LATENCY_P90_MS, LATENCY_CV, LATENCY_RUNS, LATENCY_SOURCE,
                   LATENCY_NOISY, LATENCY_BATCH_SIZE, DEVICE, PROVIDER, NODE)
    # what tells where a trial came from: not copied when a trial is answered from the cache
    ORIGIN = (BASELINE, REFERENCE, CACHED_FROM, SEED_CONFIG)


class StudyKey:
    """Keys of a study's user attributes."""

    TASK = "task"  # the task, its options and batch size: a resume must match them
    LATENCY_SOURCE = "latency_source"  # measured | predicted, fixed for the study's life
    PREFLIGHT = "preflight"  # what each technique's probe found
    WARNINGS = "warnings"  # shown at the end of summary.md
    MAX_ACCURACY_DROP = "max_accuracy_drop"  # the constraints, None when unset
    MAX_LATENCY_MS = "max_latency_ms"
    # {"name": the task's metric as a person reads it (accuracy, mAP, mIoU), "decoding": what
    # runs after the network outside the measured latency, "" when nothing does}
    METRIC = "metric"
    REFINED = "refined"  # {source trial: refined accuracy}, adopted or not
    REFINE_SECONDS = "refine_seconds"  # {source trial: seconds its refinement took}
    REMEASURED = "remeasured"  # {trial: side-by-side latency statistics}
    SEEDED = "seeded"  # the precisions the starting points were enqueued at: "reference"
    # where uniform int8 measured slower than the reference, "most compressed, first layer
    # kept" where it lost more than the allowed drop, else "most compressed"


def _declared(cls: type) -> frozenset[str]:
    return frozenset(v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str))


TRIAL_KEYS = _declared(TrialKey)
STUDY_KEYS = _declared(StudyKey)


def n_done(study: optuna.Study) -> int:
    """Trials the budget counts: every configuration screened to an end (COMPLETE, or PRUNED
    because it could not reach the front), refinements of front members excluded."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=COUNTED)
               if TrialKey.REFINED_FROM not in t.user_attrs)


def failure_reason(trial: optuna.trial.FrozenTrial) -> str:
    """Why a FAIL trial failed (a trial left RUNNING by a dead driver has no recorded reason)."""
    return str(trial.user_attrs.get(TrialKey.FAILURE, STALE))


def fail_stale(study: optuna.Study) -> None:
    """Trials left RUNNING by a driver that died are marked FAILED (retried within budget)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def reference_accuracy(study: optuna.Study) -> float | None:
    """Accuracy of the reference trial (trial 0: the least compressed model)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get(TrialKey.REFERENCE):
            return float(t.values[0])
    return None


def metric_name(study: optuna.Study) -> str:
    """The task's metric the study's accuracies are in ("accuracy", "mAP", "mIoU", ...)."""
    return (study.user_attrs.get(StudyKey.METRIC) or {}).get("name", "accuracy")


def n_constraints(study: optuna.Study) -> int:
    """How many constraints the study has (accuracy drop, latency limit)."""
    return sum(study.user_attrs.get(k) is not None
               for k in (StudyKey.MAX_ACCURACY_DROP, StudyKey.MAX_LATENCY_MS))


def constraint_values(study: optuna.Study, accuracy_drop: float,
                      latency_ms: float) -> list[float]:
    """A trial's constraint values, Optuna's convention (<= 0 is feasible); [] when the study
    has no constraint. The driver and refinement both tell trials through this."""
    out = []
    max_drop = study.user_attrs.get(StudyKey.MAX_ACCURACY_DROP)
    if max_drop is not None:
        out.append(accuracy_drop - max_drop)
    max_latency = study.user_attrs.get(StudyKey.MAX_LATENCY_MS)
    if max_latency is not None:
        out.append(latency_ms - max_latency)
    return out


def record_attrs(record: TrialRecord) -> dict[str, Any]:
    """The user attributes a finished trial keeps (everything trials.csv and MLflow show)."""
    lat = record.latency
    attrs: dict[str, Any] = {
        TrialKey.CHOICES: record.choices.applied(),
        TrialKey.LAYER_PRECISIONS: record.layer_precisions,
        TrialKey.TIMINGS: record.timings,
        TrialKey.TEST_ACCURACY: record.test_accuracy,
        TrialKey.SIZE_MB: record.size_mb,
        TrialKey.SPARSITY: record.sparsity,
        TrialKey.MACS: record.macs,
        TrialKey.PARAMS: record.params,
        TrialKey.DROPPED_BLOCKS: record.dropped_blocks,
    }
    if record.epoch_accuracy:
        attrs[TrialKey.EPOCH_ACCURACY] = record.epoch_accuracy
    if record.node:
        attrs[TrialKey.NODE] = record.node
    if lat is not None:
        attrs.update({
            TrialKey.LATENCY_MS: lat.median_ms, TrialKey.LATENCY_P90_MS: lat.p90_ms,
            TrialKey.LATENCY_CV: lat.cv, TrialKey.LATENCY_RUNS: lat.runs,
            TrialKey.LATENCY_SOURCE: lat.source, TrialKey.DEVICE: lat.device,
            TrialKey.PROVIDER: lat.provider, TrialKey.LATENCY_NOISY: lat.noisy,
            TrialKey.LATENCY_BATCH_SIZE: lat.batch_size})
    return attrs
