"""After the budget: refine the front, then re-measure it side by side with the baselines.

Screening gives every trial a short fine-tune (or none); the front's members
are what a user deploys, so they get a longer distillation (same structure
and precision plan, hence the same latency). A refinement that beats its
source is added to the study as a trial of its own (``refined_from``), so the
front and its ONNX model are what the refined model really reaches; one that
does not is recorded and the source is kept: refinement never lowers what is
reported.

Then the front's members are measured again, interleaved round by round with
the fp32 reference and uniform int8 in one task on the device, so the
speedups a user reads were measured side by side under the same load.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path
from typing import Any

import optuna

from search._base.attrs import (
    StudyKey,
    TrialKey,
    constraint_values,
    metric_name,
    record_attrs,
    reference_accuracy,
)
from search._base.names import scored
from search._base.paths import model_path
from search._base.records import Choices, LatencyStats, TrialRecord
from search.config import SearchConfig
from search.results.pareto import HV_ACCURACY_SPAN, trials_frame
from search.study.driver import trial_seed
from search.study.execution import Executor, LocalExecutor

__all__ = ["MIN_EPOCHS", "refine_epochs", "refine_front", "remeasure_front"]

log = logging.getLogger("search")


# The shortest refinement a study gives: the three fastest members of a budget-50 study of
# the default task, refined with 6 / 12 / 18 epochs, reached 97.21 / 98.61 / 98.61 % and
# 97.77 / 99.16 / 98.89 % on validation, the third 98.61 / 98.89 % with 6 / 12: 6 left them
# short of fp32's 99.16 % by more than the point a user allows, 18 bought nothing more
MIN_EPOCHS = 12


def _candidates(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Front members worth refining, in the order they are refined: those below the
    reference's accuracy, not a baseline, not refined yet. Those within the hypervolume box
    (at most 10 points below the reference), those below it (faster, since they are on
    the front) and trials stopped early that are faster than any trial in the box take
    turns, each fastest first (they lose the most).

    A member already as accurate as fp32 has nothing to buy back: a one-shot member of a
    budget-50 study at 99.44 % (fp32 99.16 %) refined with 12 epochs ended at 99.16 %, 59 s
    of the study's 327. One far below the box may not be hopeless: what a short fine-tune
    (or none) reached says little about what 12 epochs reach. Refined with 12 epochs, three
    default-task members faster than any in the box went from 12.5 % (one-shot, a block
    dropped) to 98.9 %, from 55 % (1 epoch) to 99.2 %, and from 48 % to 96 %; the first two
    would have been their studies' best points within a point of fp32."""
    df = trials_frame(study)
    if not len(df) or not df["reference"].any():
        return []
    reference = float(df.loc[df["reference"], "accuracy"].iloc[0])
    done = {int(k) for k in study.user_attrs.get(StudyKey.REFINED, {})}
    done |= {int(t.user_attrs[TrialKey.REFINED_FROM]) for t in study.get_trials(deepcopy=False)
             if TrialKey.REFINED_FROM in t.user_attrs}
    rows = df[df["on_front"] & (df["baseline"] == "") & df["cached_from"].isna()
              & df["refined_from"].isna() & ~df["trial"].isin(done)
              & (df["accuracy"] < reference)].sort_values("latency_ms")
    in_box = rows["accuracy"] >= reference - HV_ACCURACY_SPAN
    boxed = df[df["accuracy"] >= reference - HV_ACCURACY_SPAN]
    turns = zip_longest(rows.loc[in_box, "trial"], rows.loc[~in_box, "trial"],
                        _stopped_faster(study, float(boxed["latency_ms"].min()), done))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [trials[int(n)] for turn in turns for n in turn if n is not None]


def _stopped_faster(study: optuna.Study, latency_ms: float, done: set[int]) -> list[int]:
    """Trials stopped early that are faster than ``latency_ms`` and within the study's
    latency limit (a refinement cannot change a latency), fastest first.

    A screened latency is final and a stopped fine-tune's accuracy says little of what 12
    epochs reach: in a budget-20 study of MobileNetV2 the enqueued "pruned-0.65" seed,
    the fastest trial (0.114 ms against the best refined member's 0.143), was stopped at
    31 % after one epoch, while the "pruned-0.5" seed went from 92.8 % after 3 epochs to
    98.9 % refined."""
    limit = study.user_attrs.get(StudyKey.MAX_LATENCY_MS)
    stopped = [t for t in study.get_trials(deepcopy=False,
                                           states=(optuna.trial.TrialState.PRUNED,))
               if t.user_attrs.get(TrialKey.LATENCY_MS) is not None and t.number not in done
               and TrialKey.CACHED_FROM not in t.user_attrs and TrialKey.CHOICES in t.user_attrs
               and t.user_attrs[TrialKey.LATENCY_MS] < latency_ms
               and (limit is None or t.user_attrs[TrialKey.LATENCY_MS] <= limit)]
    return [t.number for t in sorted(stopped, key=lambda t: t.user_attrs[TrialKey.LATENCY_MS])]


def _latency_ms(trial: optuna.trial.FrozenTrial) -> float:
    """A trial's latency: its objective, or what a stopped trial measured before stopping."""
    return float(trial.values[1]) if trial.values else float(trial.user_attrs[TrialKey.LATENCY_MS])


def _reached_reference(study: optuna.Study, latency_ms: float) -> int | None:
    """A trial at least as fast as ``latency_ms`` and as accurate as the reference, if any.

    A member slower than such a trial stays dominated unless its refinement beats fp32:
    in a budget-50 study of the default task, the fastest member, refined first, reached
    fp32's 99.16 %; the three slower ones refined after it (23 s of the refinement's 28)
    ended at 99.16 % or below, dominated."""
    df = trials_frame(study)
    if not len(df) or not df["reference"].any():
        return None
    reference = float(df.loc[df["reference"], "accuracy"].iloc[0])
    rows = df[(df["latency_ms"] <= latency_ms) & (df["accuracy"] >= reference)
              & ~df["reference"]]
    return int(rows.sort_values("latency_ms")["trial"].iloc[0]) if len(rows) else None


def _refined_choices(trial: optuna.trial.FrozenTrial, epochs: int) -> Choices:
    flat = dict(trial.user_attrs[TrialKey.CHOICES])
    precisions = {k.split(".", 1)[1]: flat.pop(k) for k in list(flat) if k.startswith("precision.")}
    segments = {k.split(".", 1)[1]: flat.pop(k) for k in list(flat)
                if k.startswith("structured_ratio.")}
    choices = Choices(**flat, precisions=precisions, segment_ratios=segments)
    lr = choices.lr if choices.epochs > 0 else 3e-3
    return replace(choices, epochs=max(epochs, choices.epochs), lr=lr)


def refine_epochs(config: SearchConfig, longest: int) -> int:
    """A refinement's epochs: ``--refine-epochs``, else twice the space's ``longest``
    fine-tune and at least :data:`MIN_EPOCHS`."""
    return config.refine_epochs or max(MIN_EPOCHS, 2 * longest)


def refine_front(study: optuna.Study, executor: Executor | LocalExecutor, config: SearchConfig,
                 *, epochs: int = MIN_EPOCHS, parallel: int = 1) -> list[int]:
    """Refine at most ``config.refine`` of the front's members with ``epochs`` of
    distillation, ``parallel`` at a time; returns the numbers of the trials added."""
    members, output_dir = config.refine, Path(config.output_dir)
    if members <= 0:
        return []
    candidates = _candidates(study)
    if not candidates:
        return []
    shown = ", ".join(str(t.number) for t in candidates[:members])
    more = len(candidates) - members
    log.info("refining %d front member(s) with %d epochs of distillation: trials %s%s",
             min(members, len(candidates)), epochs, shown,
             f" ({more} more candidate(s) take the place of any that a refined trial already "
             "beats)" if more > 0 else "")
    deadline = time.monotonic() + config.refine_timeout_s
    pending = list(candidates)
    in_flight: dict[Any, optuna.trial.FrozenTrial] = {}
    added: list[int] = []
    slots = members  # a member skipped because a refined one beats it takes none
    while (pending and slots) or in_flight:
        while pending and slots and len(in_flight) < parallel \
                and time.monotonic() < deadline:
            source = pending.pop(0)
            beaten = _reached_reference(study, _latency_ms(source))
            if beaten is not None:
                log.info("trial %d not refined: trial %d is as fast or faster and already as "
                         "accurate as fp32", source.number, beaten)
                continue
            record = TrialRecord(source.number, _refined_choices(source, epochs),
                                 seed=trial_seed(config.seed, source.number))
            in_flight[executor.submit_finetune(record)] = source
            slots -= 1
        if not in_flight:
            if pending and slots:
                log.warning("refinement time bound (%.0f s) reached; %d member(s) not refined",
                            config.refine_timeout_s, min(slots, len(pending)))
            break
        ready = executor.wait(list(in_flight), timeout=None)
        source = in_flight.pop(ready[0])
        try:
            record: TrialRecord = executor.result(ready[0])
        except Exception as exc:
            log.warning("refining trial %d failed: %s", source.number, exc)
            continue
        if record.error or record.onnx_model is None:
            log.warning("refining trial %d failed: %s", source.number, record.error)
            continue
        try:
            number = _adopt(study, source, record, output_dir)
        except OSError as exc:  # a full disk: the source stays, a rerun refines again
            log.warning("refining trial %d: cannot save its model (%s); kept as it was",
                        source.number, exc.strerror or exc)
            continue
        if number is not None:
            added.append(number)
    return added


def _adopt(study: optuna.Study, source: optuna.trial.FrozenTrial, record: TrialRecord,
           output_dir: Path) -> int | None:
    """Add the refinement as a trial when it beats its source; record it either way."""
    before = source.values[0] if source.values else None  # None: it was stopped early
    metric = metric_name(study)
    was = scored(before, metric) if before is not None else "stopped early"
    if record.accuracy is None or (before is not None and record.accuracy <= before):
        _mark_refined(study, source.number, record)
        log.info("trial %d refined to %s (was %s): kept as it was", source.number,
                 scored(record.accuracy if record.accuracy is not None else float("nan"), metric),
                 was)
        return None
    number = len(study.get_trials(deepcopy=False))
    path = model_path(output_dir, number)
    try:
        path.write_bytes(record.onnx_model or b"")
    except OSError:
        path.unlink(missing_ok=True)
        raise
    attrs: dict[str, Any] = {k: v for k, v in source.user_attrs.items()
                             if k in TrialKey.MEASUREMENT}
    attrs.update(record_attrs(record))
    reference = reference_accuracy(study)
    drop = reference - record.accuracy if reference is not None else 0.0
    attrs.update({TrialKey.REFINED_FROM: source.number, TrialKey.SCREENED_ACCURACY: before,
                  TrialKey.ACCURACY_DROP: drop})
    constraints = constraint_values(study, drop, _latency_ms(source))
    if constraints:
        attrs[TrialKey.CONSTRAINT_VALUES] = constraints
    params, distributions = dict(source.params), dict(source.distributions)
    if "epochs" in params:
        epochs = record.choices.epochs
        params["epochs"] = epochs
        old = distributions["epochs"]
        distributions["epochs"] = optuna.distributions.IntDistribution(old.low, max(old.high, epochs))
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions=distributions, values=[record.accuracy, _latency_ms(source)],
        user_attrs=attrs))
    _mark_refined(study, source.number, record)
    log.info("trial %d refined to %s (was %s): added as trial %d", source.number,
             scored(record.accuracy, metric), was, number)
    return number


def _mark_refined(study: optuna.Study, source: int, record: TrialRecord) -> None:
    for attr, value in ((StudyKey.REFINED, record.accuracy),
                        (StudyKey.REFINE_SECONDS, round(sum(record.timings.values()), 3))):
        done = dict(study.user_attrs.get(attr, {}))
        done[str(source)] = value
        study.set_user_attr(attr, done)


def _interleaved(models: dict[int, bytes], profile, input_shape, rounds: int  # noqa: ANN001
                 ) -> dict[int, list[float]]:
    from search.latency import measure_latency

    out: dict[int, list[float]] = {n: [] for n in models}
    for _ in range(rounds):
        for n, model in models.items():
            out[n].append(measure_latency(model, profile, input_shape).median_ms)
    return out


def remeasure_front(study: optuna.Study, executor: Executor | LocalExecutor, output_dir: Path,
                    rounds: int | None = None) -> dict[int, LatencyStats] | None:
    """Measure the baselines and the front's members again, interleaved, in one device task
    (``rounds``, default the profile's ``measure.side_by_side_rounds``); the result is kept
    in the study (``remeasured``) and shown in pareto.csv."""
    if executor.predicts:
        return None
    rounds = rounds or executor.profile.measure.side_by_side_rounds
    df = trials_frame(study)
    rows = df[df["on_front"] | (df["baseline"] != "")]
    models = {}
    for n in rows["trial"]:
        path = model_path(output_dir, int(n))
        if path.exists():
            models[int(n)] = path.read_bytes()
    if len(models) < 2:
        return None
    samples = executor.result(executor.submit_on_device(_interleaved, models, executor.profile,
                                      executor.task.input_shape, rounds))
    stats = {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                 "rounds": len(v), "samples_ms": [round(s, 6) for s in v]}
             for n, v in samples.items()}
    study.set_user_attr(StudyKey.REMEASURED, {str(n): s for n, s in stats.items()})
    return stats  # type: ignore[return-value]
