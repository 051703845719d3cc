"""The ask / screen / measure / fine-tune / tell loop of one study invocation.

Latency comes first: a trial's structure and precision plan decide its
latency before any fine-tuning, so each trial is first *screened* (pruned,
exported, quantized), its latency measured or predicted, and only then,
knowing the accuracy it would need to enter the front at that latency, is it
fine-tuned, or stopped (Optuna state PRUNED, the reason in its user
attributes). A fine-tune that falls too far behind after an epoch stops too.

Only this driver writes to the Optuna storage. The loop knows nothing of
MLflow: what happens when a trial finishes (child runs, hypervolume) is a
callback, the way ``optuna.study.Study.optimize(callbacks=...)`` is shaped.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from search._base.attrs import (
    COUNTED,
    StudyKey,
    TrialKey,
    constraint_values,
    metric_name,
    n_constraints,
    n_done,
    record_attrs,
    reference_accuracy,
)
from search._base.errors import SearchError
from search._base.names import scored
from search._base.paths import model_path
from search._base.records import Choices, TrialRecord
from search.config import SearchConfig
from search.results.pareto import HV_ACCURACY_SPAN, best_speedup, trials_frame
from search.space.resolve import ResolvedSpace
from search.space.starts import baselines, seeds
from search.study.execution import Executor, LocalExecutor
from search.study.sampling import sample

__all__ = ["Driver", "TrialCallback", "fine_tune_prospect", "trial_seed"]

log = logging.getLogger("search")
_MIN_FINE_TUNES = 3  # completed fine-tunes before their median sets what a fine-tune can expect
TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def trial_seed(study_seed: int, number: int) -> int:
    """The seed of trial ``number``'s training (and of its refinement): another per trial,
    the same on a resume."""
    return study_seed * 100_003 + number


def _choices_key(flat: dict[str, Any]) -> str:
    return json.dumps({k: (round(v, 9) if isinstance(v, float) else v) for k, v in flat.items()},
                      sort_keys=True, default=str)


def fine_tune_prospect(frame: pd.DataFrame,
                       latency_ms: float) -> tuple[float | None, float | None, str]:
    """For a screened trial at ``latency_ms``: (the accuracy it must beat to be on the front,
    the accuracy its fine-tune can expect to reach, where that expectation comes from); None
    before any trial completed. ``frame`` is the study's :func:`~search.results.pareto.trials_frame`.

    The expectation is the median accuracy that completed fine-tunes at least as slow
    reached: they kept at least as much of the model, so they are, if anything, the more
    accurate. A trial that needs more than they typically reach would most likely end
    dominated, its fine-tune spent for nothing (replaying a budget-50 study of the default
    task: the 10 fine-tunes this stops and the looser bar below let through all ended
    dominated, a quarter of its trial time). Until ``_MIN_FINE_TUNES`` such fine-tunes
    exist it is the best accuracy any trial reached.
    """
    df = frame
    if not len(df):
        return None, None, ""
    ok = df[df["feasible"]] if "feasible" in df else df
    faster = ok[ok["latency_ms"] <= latency_ms]
    needed = float(faster["accuracy"].max()) if len(faster) else None
    epochs = df["param.epochs"] if "param.epochs" in df else pd.Series(0, index=df.index)
    tuned = df[(df["baseline"] == "") & df["refined_from"].isna() & df["cached_from"].isna()
               & (epochs.fillna(0) > 0) & (df["latency_ms"] >= latency_ms)]
    if len(tuned) >= _MIN_FINE_TUNES:
        return needed, float(tuned["accuracy"].median()), (
            f"the median of the {len(tuned)} completed fine-tunes at least as slow")
    return needed, float(df["accuracy"].max()), "the best accuracy so far"


_FIRST_KEPT = "most compressed, first layer kept"  # StudyKey.SEEDED after a lossy int8


@dataclass
class _InFlight:
    trial: optuna.Trial
    stage: str  # screen | measure | finetune
    started: float = field(default_factory=time.perf_counter)


class Driver:
    """Runs trials until ``budget`` of them are done (COMPLETE or PRUNED).

    ``callbacks`` are called with ``(study, frozen_trial)`` after every trial
    that finishes, whatever its state; they must not raise (a callback that
    does is logged and skipped).
    """

    def __init__(self, config: SearchConfig, study: optuna.Study, resolved: ResolvedSpace,
                 executor: Executor | LocalExecutor, callbacks: Sequence[TrialCallback] = (), *,
                 parallel: int = 1, show_progress: bool = True) -> None:
        self.settings, self.study, self.resolved = config, study, resolved
        self.executor, self.callbacks = executor, list(callbacks)
        self.parallel, self.show_progress = parallel, show_progress
        self.output_dir = Path(config.output_dir or config.runs_root / config.study_name)
        model_path(self.output_dir, 0).parent.mkdir(parents=True, exist_ok=True)
        # the constraints every trial is told against, and the front is read with
        study.set_user_attr(StudyKey.MAX_ACCURACY_DROP, config.max_accuracy_drop)
        study.set_user_attr(StudyKey.MAX_LATENCY_MS, config.max_latency_ms)
        self.in_flight: dict[Any, _InFlight] = {}  # an executor's handle -> its trial
        self.n_failed = 0
        self.frame = trials_frame(study)  # the study's table as of the last completed trial
        self.stage_time: dict[str, float] = {}  # wall seconds of each kind of task, summed
        # an enqueued baseline or seed is exactly what it says, whatever the space fixes
        # a resumed study pins its seeds at the precisions they were enqueued at
        seeded = study.user_attrs.get(StudyKey.SEEDED, "")
        anchors = baselines(resolved)
        self._pinned = dict(anchors + seeds(resolved, reference_precisions=seeded == "reference",
                                            first_kept=seeded == _FIRST_KEPT))
        self._n_baselines = len(anchors)  # a time limit never cuts them
        self._metric = metric_name(study)
        self._seeds_pending = StudyKey.SEEDED not in study.user_attrs and not any(
            TrialKey.SEED_CONFIG in t.user_attrs for t in study.get_trials(deepcopy=False))

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Run until ``budget`` trials are done.

        Ctrl-C stops asking for trials and gives the running ones
        ``grace_period_s`` to finish; a second Ctrl-C (or the end of the grace
        period) marks them FAILED. Either way KeyboardInterrupt is raised at the
        end so the caller reports an interrupted study.
        """
        from tqdm.auto import tqdm

        s = self.settings
        done = n_done(self.study)
        bar = tqdm(total=s.budget, initial=min(done, s.budget), unit="trial", desc=s.study_name,
                   disable=not self.show_progress, file=sys.stderr, dynamic_ncols=True)
        stop = threading.Event()
        with self._first_sigint_sets(stop):
            try:
                self._loop(done, bar, stop)
            except BaseException:
                self._abandon_in_flight("driver interrupted")
                raise
            finally:
                bar.close()
        if stop.is_set():
            self._abandon_in_flight("interrupted: grace period over")
            raise KeyboardInterrupt

    @contextmanager
    def _first_sigint_sets(self, stop: threading.Event) -> Iterator[None]:
        """While inside, a first Ctrl-C sets ``stop`` (a second raises KeyboardInterrupt);
        only in the main thread, where Python delivers signals."""
        def on_sigint(signum, frame):  # noqa: ANN001, ARG001
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()
            log.warning("interrupted: no new trials; %d running trial(s) get %.0f s to finish "
                        "(Ctrl-C again to stop now)", len(self.in_flight),
                        self.settings.grace_period_s)

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _loop(self, done: int, bar: Any, stop: threading.Event) -> None:  # noqa: ANN401
        """Keep ``parallel`` trials in flight and advance each as its task ends, until the
        budget is done or, after ``stop``, the running ones ended or their grace is over."""
        s = self.settings
        max_failures = s.failure_limit
        deadline: float | None = None
        closing = None if s.time_limit_s is None else time.monotonic() + s.time_limit_s
        while done < s.budget:
            if stop.is_set():
                deadline = deadline or time.monotonic() + s.grace_period_s
                if not self.in_flight or time.monotonic() > deadline:
                    return
            elif closing is not None and time.monotonic() > closing and done >= self._n_baselines:
                if not self.in_flight:
                    log.info("time limit (%.0f s) reached after %d of %d trials: no new trial "
                             "started", s.time_limit_s, done, s.budget)
                    return
            else:
                while len(self.in_flight) < self.parallel and done + len(self.in_flight) < s.budget:
                    self._enqueue_seeds(done)
                    state = self._start_trial()
                    if state in COUNTED:  # answered from the cache
                        done += 1
                        bar.update(1)
            ready = self.executor.wait(list(self.in_flight), timeout=1.0)
            if not ready:
                continue
            state = self._advance(ready[0])
            if state in COUNTED:
                done += 1
                bar.update(1)
                bar.set_postfix_str(self._postfix(), refresh=True)
            elif state is optuna.trial.TrialState.FAIL:
                self.n_failed += 1
                if self.n_failed >= max_failures:
                    raise SearchError(f"{self.n_failed} trials failed; stopping. The last "
                                      "failure reason is in trials.csv and MLflow.")

    def _enqueue_seeds(self, done: int) -> None:
        """Enqueue the known-good starting points once the baselines have run, at the most
        compressed precisions, or at the reference's where uniform int8 measured slower than
        the reference (their latency decided by measurement, not by a precision's name)."""
        if not self._seeds_pending:
            return
        unfinished = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        if any(TrialKey.BASELINE in t.user_attrs
               for t in self.study.get_trials(deepcopy=False, states=unfinished)):
            return
        df = self.frame
        ref, int8 = df[df["reference"]], df[df["baseline"] == "int8"]
        both = bool(len(ref) and len(int8))
        slower = both and float(int8["latency_ms"].iloc[0]) >= float(ref["latency_ms"].iloc[0])
        lost = float(ref["accuracy"].iloc[0] - int8["accuracy"].iloc[0]) if both else 0.0
        first_kept = not slower and lost > self.settings.report_drop
        left = max(0, self.settings.budget - done - len(self.in_flight))
        for label, params in seeds(self.resolved, reference_precisions=slower,
                                   first_kept=first_kept)[:left]:
            self.study.enqueue_trial(params, user_attrs={TrialKey.SEED_CONFIG: label})
            self._pinned[label] = params
        self.study.set_user_attr(StudyKey.SEEDED, "reference" if slower else
                                 _FIRST_KEPT if first_kept else "most compressed")
        self._seeds_pending = False
        if slower:
            log.info("uniform int8 measured slower than the reference: the starting points keep "
                     "the reference's precisions")
        elif first_kept:
            log.info("uniform int8 lost %.2f %s points (more than %g): the starting points "
                     "keep the first layer at the reference's precision", lost, self._metric,
                     self.settings.report_drop)

    def _start_trial(self) -> optuna.trial.TrialState | None:
        """Ask for a trial and start screening it, or answer it from the cache."""
        trial = self.study.ask()
        label = trial.user_attrs.get(TrialKey.BASELINE) or trial.user_attrs.get(TrialKey.SEED_CONFIG)
        try:
            choices = sample(self.resolved, trial, self._pinned.get(label))
        except Exception as exc:  # a space the checks let through: fatal, but leave no RUNNING
            self._fail(trial, f"sampling: {type(exc).__name__}: {exc}", None)
            raise SearchError(f"trial {trial.number} could not be sampled: {exc}") from exc
        trial.set_user_attr(TrialKey.CHOICES, choices.applied())
        source = self._cached(choices)
        if source is not None:
            return self._answer_from_cache(trial, source)
        record = TrialRecord(trial.number, choices, seed=trial_seed(self.settings.seed, trial.number))
        self._submit(self.executor.submit_screen(record), trial, "screen")
        return None

    def _submit(self, ref: Any, trial: optuna.Trial, stage: str) -> None:
        self.in_flight[ref] = _InFlight(trial, stage)

    def _cached(self, choices: Choices) -> optuna.trial.FrozenTrial | None:
        """A done trial with exactly these choices (samplers do propose repeats)."""
        key = _choices_key(choices.applied())
        for t in self.study.get_trials(deepcopy=False, states=COUNTED):
            if TrialKey.REFINED_FROM not in t.user_attrs and \
                    _choices_key(t.user_attrs.get(TrialKey.CHOICES, {})) == key:
                return t
        return None

    def _answer_from_cache(self, trial: optuna.Trial,
                           source: optuna.trial.FrozenTrial) -> optuna.trial.TrialState:
        origin = source.user_attrs.get(TrialKey.CACHED_FROM, source.number)
        for key, value in source.user_attrs.items():
            if key not in TrialKey.ORIGIN:
                trial.set_user_attr(key, value)
        trial.set_user_attr(TrialKey.CACHED_FROM, origin)
        log.info("trial %d repeats trial %d's choices: answered from the cache", trial.number,
                 origin)
        if source.state == optuna.trial.TrialState.PRUNED:
            return self._finish(trial, state=optuna.trial.TrialState.PRUNED)
        model = model_path(self.output_dir, source.number)
        if model.exists():
            model_path(self.output_dir, trial.number).write_bytes(model.read_bytes())
        return self._tell_complete(trial, list(source.values))

    def _advance(self, ref: Any) -> optuna.trial.TrialState | None:
        flight = self.in_flight.pop(ref)
        trial, stage = flight.trial, flight.stage
        self.stage_time[stage] = self.stage_time.get(stage, 0.0) + \
            time.perf_counter() - flight.started
        try:
            record: TrialRecord = self.executor.result(ref)
        except Exception as exc:  # the worker died or raised outside a stage
            return self._fail(trial, f"{stage}: {type(exc).__name__}: {str(exc)[-500:]}", None)
        if record.error:
            return self._fail(trial, record.error, record)
        if stage == "screen" and not self.executor.predicts:
            self._submit(self.executor.submit_measure(record), trial, "measure")
            return None
        if stage in ("screen", "measure"):
            return self._after_latency(trial, record)
        if record.stopped:
            return self._prune(trial, record, f"fine-tune stopped {record.stopped}")
        return self._complete(trial, record)

    # --- multi-fidelity --------------------------------------------------------------------
    def _after_latency(self, trial: optuna.Trial, record: TrialRecord) -> optuna.trial.TrialState | None:
        """The latency is known: score a one-shot trial, or decide whether to fine-tune."""
        assert record.latency is not None
        # what knowing where the trial lands cost, before any fine-tune (the stage timings
        # go on adding up through the fine-tune's own prune, export and quantize)
        trial.set_user_attr(TrialKey.SCREEN_SECONDS, round(sum(record.timings.values()), 4))
        if record.choices.epochs == 0:
            return self._complete(trial, record)
        record.onnx_model = None  # the screened model only served to measure the latency
        needed, expected, why = fine_tune_prospect(self.frame, record.latency.median_ms)
        if self.settings.early_stopping and needed is not None and expected is not None \
                and needed >= expected:
            return self._prune(trial, record, (
                f"cannot reach the front at {record.latency.median_ms:.3f} ms: a trial at least "
                f"as fast already has {scored(needed, self._metric)}, and a fine-tune is not "
                f"expected to beat {scored(expected, self._metric)} ({why})"))
        if self.settings.early_stopping:
            record.needed_accuracy = self._fine_tune_bar(needed)
        self._submit(self.executor.submit_finetune(record), trial, "finetune")
        return None

    def _fine_tune_bar(self, needed: float | None) -> float | None:
        """The accuracy a fine-tune must plausibly reach to be worth finishing: on the front,
        within the study's accuracy constraint, and no more than the hypervolume box's span
        (10 points) below the reference, where nobody would deploy it."""
        reference = reference_accuracy(self.study)
        bars = [needed] if needed is not None else []
        if reference is not None:
            bars.append(reference - HV_ACCURACY_SPAN)
            if self.settings.max_accuracy_drop is not None:
                bars.append(reference - self.settings.max_accuracy_drop)
        return max(bars) if bars else None

    # --- telling -------------------------------------------------------------------------
    def _finish(self, trial: optuna.Trial, values: list[float] | None = None,
                state: optuna.trial.TrialState = optuna.trial.TrialState.COMPLETE
                ) -> optuna.trial.TrialState:
        frozen = self.study.tell(trial, values, state=state)
        if state == optuna.trial.TrialState.COMPLETE:
            self.frame = trials_frame(self.study)  # once per trial: the bar and the bar to beat
        for callback in self.callbacks:
            try:
                callback(self.study, frozen)
            except Exception as exc:  # a callback never stops the study
                log.warning("a trial callback failed on trial %d: %s: %s", frozen.number,
                            type(exc).__name__, exc)
        return state

    def _fail(self, trial: optuna.Trial, reason: str,
              record: TrialRecord | None) -> optuna.trial.TrialState:
        trial.set_user_attr(TrialKey.FAILURE, reason)
        if record is not None:
            trial.set_user_attr(TrialKey.TIMINGS, record.timings)
        log.warning("trial %d failed: %s", trial.number, reason)
        return self._finish(trial, state=optuna.trial.TrialState.FAIL)

    def _prune(self, trial: optuna.Trial, record: TrialRecord,
               reason: str) -> optuna.trial.TrialState:
        for key, value in record_attrs(record).items():
            trial.set_user_attr(key, value)
        trial.set_user_attr(TrialKey.PRUNED_REASON, reason)
        n = n_constraints(self.study)
        if n:  # a constrained sampler learns that this region does not pay
            trial.set_user_attr(TrialKey.CONSTRAINT_VALUES, [1.0] * n)
        log.info("trial %d stopped early: %s", trial.number, reason)
        return self._finish(trial, state=optuna.trial.TrialState.PRUNED)

    def _complete(self, trial: optuna.Trial, record: TrialRecord) -> optuna.trial.TrialState:
        assert record.onnx_model is not None and record.latency is not None
        path = model_path(self.output_dir, trial.number)
        try:
            path.write_bytes(record.onnx_model)
        except OSError as exc:  # a full disk: every later trial would fail the same way
            path.unlink(missing_ok=True)
            self._fail(trial, f"saving its model: {exc.strerror or exc}", record)
            raise SearchError(
                f"cannot write {path} ({exc.strerror or exc}); every completed trial is kept in "
                "the Optuna storage: free space and rerun the same command to resume"
            ) from None
        for key, value in record_attrs(record).items():
            trial.set_user_attr(key, value)
        if record.latency.noisy:
            log.warning("trial %d: latency CV %.2f stayed above the profile's max_cv after a "
                        "repeat; flagged latency_noisy", trial.number, record.latency.cv)
        return self._tell_complete(trial, [record.accuracy, record.latency.median_ms])

    def _tell_complete(self, trial: optuna.Trial, values: list[float]) -> optuna.trial.TrialState:
        """Constraint values (Optuna's convention: <= 0 is feasible), then tell."""
        reference = reference_accuracy(self.study)
        drop = reference - values[0] if reference is not None else 0.0
        trial.set_user_attr(TrialKey.ACCURACY_DROP, drop)
        constraints = constraint_values(self.study, drop, values[1])
        if constraints:
            trial.set_user_attr(TrialKey.CONSTRAINT_VALUES, constraints)
        return self._finish(trial, values)

    def _abandon_in_flight(self, reason: str) -> None:
        for ref, flight in list(self.in_flight.items()):
            self.executor.cancel(ref)
            try:
                flight.trial.set_user_attr(TrialKey.FAILURE, reason)
                self.study.tell(flight.trial, state=optuna.trial.TrialState.FAIL)
            except Exception:  # the storage may be what failed; nothing else to do
                pass
        self.in_flight.clear()

    def _postfix(self) -> str:
        df: pd.DataFrame = self.frame
        best = best_speedup(df, self.settings.report_drop) if len(df) else None
        best_text = f"{best:.2f}x" if best else "n/a"
        on_front = int(df["on_front"].sum()) if len(df) else 0
        return f"front {on_front}, best speedup within {self.settings.report_drop:g} pt {best_text}"
