"""The study driver: one process asks Optuna, runs trials on Ray, tells results.

Only this driver writes to the Optuna storage and to MLflow. A trial's result
is in the Optuna storage before anything else is done with it, so a study can
be interrupted at any moment and resumed by rerunning the same command.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import ray
import yaml

from search._paths import cache_dir
from search._redact import redact
from search.config import SearchConfig, ensure_writable
from search.errors import ConfigError, SearchError
from search.execution import (
    Executor,
    check_address,
    connect,
    device_reachable,
    plan_parallel,
)
from search.latency.calibration import (
    CalibrationChoice,
    CalibrationStore,
    Measurement,
    architecture_key,
)
from search.latency.predict import costs_from_onnx, predict_ms
from search.pareto import best_speedup, hypervolume, plot_front, trials_frame, write_html
from search.pipeline import model_facts, student_layers
from search.profiles import HardwareProfile, load_profile, measurable_here
from search.record import Choices, TrialRecord
from search.spaces import ResolvedSpace, SearchSpace, load_space, resolve_space
from search.tasks import check_task, load_task
from search.tracking import (
    Tracker,
    check_tracking_uri,
    default_tracking_uri,
    server_reachable,
)

__all__ = ["StudyResult", "make_sampler", "run_search"]

log = logging.getLogger("search")
_TRIAL_METRICS = ("accuracy", "test_accuracy", "latency_median_ms", "latency_p90_ms",
                  "latency_cv", "size_mb", "sparsity", "macs", "params")


@dataclass
class StudyResult:
    """What a finished (or interrupted) study leaves behind."""

    study_name: str
    output_dir: Path
    trials: pd.DataFrame
    front: pd.DataFrame  # the Pareto front plus the baselines (see its on_front column)
    tracking_uri: str
    parent_run_id: str
    best_speedup: float | None
    n_failed: int
    wall_s: float
    interrupted: bool = False
    phases: dict[str, float] = field(default_factory=dict)  # setup, trials, finish (seconds)


def _constraint_values(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's constraint convention: <= 0 is feasible. Computed by the driver at tell time."""
    return list(trial.user_attrs.get("constraint_values", [0.0]))


def make_sampler(name: str, seed: int, budget: int,
                 constrained: bool = False) -> optuna.samplers.BaseSampler:
    """Seeded sampler; re-created identically when a study resumes (Optuna does not persist it).

    With ``constrained``, the sampler learns from the trials' constraint values
    (accuracy drop, latency target) and prefers feasible regions.
    """
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*independent sampler.*")
    constraints = _constraint_values if constrained else None
    startup = max(4, min(10, budget // 3))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=startup, constraints_func=constraints)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, budget // 3)),
                                             constraints_func=constraints)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup,
                                         constraints_func=constraints,
                                         warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


def open_storage(url: str) -> str | optuna.storages.BaseStorage:
    """An Optuna storage: any RDB URL, or a journal file (``journal:///path`` or ``*.journal``).

    A journal file suits a shared filesystem where no database server runs.
    """
    path = None
    if url.startswith("journal://"):
        path = url[len("journal://"):]
    elif url.endswith((".journal", ".jsonl")) and "://" not in url:
        path = url
    if path is None:
        return url
    from optuna.storages.journal import JournalFileBackend

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(path))


@contextmanager
def _driver_lock(output_dir: Path, study_name: str) -> Iterator[None]:
    """One driver per study output directory: a second one refuses instead of racing.

    An advisory lock (flock) on ``<output-dir>/.driver.lock``, released when the
    process dies, so a killed driver never blocks its own resume.
    """
    import fcntl

    path = output_dir / ".driver.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise ConfigError(
                f"study {study_name!r} is already being run by another driver (pid {owner}, "
                f"lock {path}); wait for it to finish or stop it, then rerun to resume"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_same_task(study: optuna.Study, cfg: SearchConfig) -> None:
    """A resumed study must compress the same task (same data, model, teacher): else its
    trials would mix results of two problems."""
    task = {"task": cfg.task, **{k: str(v) for k, v in asdict(cfg.task_options()).items()
                                 if v is not None}}
    previous = study.user_attrs.get("task")
    if previous is not None and previous != task:
        changed = sorted(k for k in set(previous) | set(task) if previous.get(k) != task.get(k))
        raise ConfigError(
            f"study {cfg.study_name!r} was run with {', '.join(f'{k}={previous.get(k)}' for k in changed)}; "
            f"resuming it with {', '.join(f'{k}={task.get(k)}' for k in changed)} would mix two "
            "problems in one front. Use the original settings or another --study-name"
        )
    study.set_user_attr("task", task)


def _fail_stale(study: optuna.Study) -> None:
    """Trials left RUNNING by a driver that died are marked FAILED (retried within budget)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "failure", "driver stopped mid-trial")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def _n_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _choices_key(flat: dict[str, Any]) -> str:
    return json.dumps({k: (round(v, 9) if isinstance(v, float) else v) for k, v in flat.items()},
                      sort_keys=True, default=str)


def _record_attrs(record: TrialRecord) -> dict[str, Any]:
    lat = record.latency
    attrs: dict[str, Any] = {
        "choices": record.choices.flat(),
        "layer_precisions": record.layer_precisions,
        "timings": record.timings,
        "test_accuracy": record.test_accuracy,
        "size_mb": record.size_mb,
        "sparsity": record.sparsity,
        "macs": record.macs,
        "params": record.params,
        "dropped_blocks": record.dropped_blocks,
    }
    if record.node:
        attrs["node"] = record.node
    if lat is not None:
        attrs.update(latency_p90_ms=lat.p90_ms, latency_cv=lat.cv, latency_runs=lat.runs,
                     latency_source=lat.source, device=lat.device, provider=lat.provider,
                     latency_noisy=lat.noisy)
    return attrs


def _reference_accuracy(study: optuna.Study) -> float | None:
    """Accuracy of the reference trial (trial 0: the least compressed model)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("reference"):
            return float(t.values[0])
    return None


def _log_frozen(tracker: Tracker, trial: optuna.trial.FrozenTrial,
                reference_accuracy: float | None = None) -> None:
    """Log a finished trial to MLflow from what the Optuna storage holds."""
    a = trial.user_attrs
    complete = trial.state == optuna.trial.TrialState.COMPLETE
    metrics: dict[str, float | None] = {}
    if complete:
        metrics = {"accuracy": trial.values[0], "latency_median_ms": trial.values[1]}
        if reference_accuracy is not None:
            metrics["accuracy_drop"] = reference_accuracy - trial.values[0]
        metrics.update({k: a.get(k) for k in _TRIAL_METRICS if k in a})
        metrics.update({f"time_{k}_s": v for k, v in a.get("timings", {}).items()})
        precisions = list(a.get("layer_precisions", {}).values())
        if precisions:
            for p in sorted(set(precisions)):
                metrics[f"share_{p}"] = precisions.count(p) / len(precisions)
    tags = {
        "state": trial.state.name,
        "latency_source": a.get("latency_source", ""),
        "device": a.get("device", ""),
        "baseline": a.get("baseline", ""),
    }
    if complete:
        tags["latency_noisy"] = str(bool(a.get("latency_noisy", False))).lower()
    if "failure" in a:
        tags["failure_reason"] = a["failure"]
        tags["failure_stage"] = a["failure"].partition(":")[0]
    if "cached_from" in a:
        tags["cached_from"] = str(a["cached_from"])
    params = a.get("choices") or dict(trial.params)
    tracker.log_trial(trial.number, params, metrics, tags, failed=not complete)


def _catch_up(tracker: Tracker, study: optuna.Study) -> None:
    """Log every finished trial MLflow lacks (missed during an outage or before a crash)."""
    tracker.refresh()
    reference = _reference_accuracy(study)
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and t.number not in tracker.logged:
            _log_frozen(tracker, t, reference)


class _Driver:
    """The ask / run / tell loop of one study invocation."""

    def __init__(self, cfg: SearchConfig, study: optuna.Study, resolved: ResolvedSpace,
                 executor: Executor, tracker: Tracker, profile: HardwareProfile,
                 show_progress: bool) -> None:
        self.cfg, self.study, self.resolved = cfg, study, resolved
        self.executor, self.tracker, self.profile = executor, tracker, profile
        self.models_dir = Path(cfg.output_dir) / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.in_flight: dict[ray.ObjectRef, tuple[optuna.Trial, str]] = {}
        self.n_failed = 0
        self.tracking_s = 0.0  # time spent logging trials to MLflow
        self.tracking_behind = False  # some trial could not be logged yet
        self.show_progress = show_progress
        self.frame = trials_frame(study)  # the study's table as of the last completed trial

    def run(self) -> None:
        """Run until ``budget`` trials are COMPLETE.

        Ctrl-C stops asking for trials and gives the running ones
        ``grace_period_s`` to finish; a second Ctrl-C (or the end of the grace
        period) marks them FAILED. Either way KeyboardInterrupt is raised at the
        end so the caller reports an interrupted study.
        """
        from tqdm import tqdm

        budget = self.cfg.budget
        done = _n_complete(self.study)
        bar = tqdm(total=budget, initial=min(done, budget), unit="trial", desc=self.cfg.study_name,
                   disable=not self.show_progress, file=sys.stderr, dynamic_ncols=True)
        max_failures = max(10, budget)
        stop = threading.Event()

        def on_sigint(signum, frame):  # noqa: ANN001, ARG001
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()
            log.warning("interrupted: no new trials; %d running trial(s) get %.0f s to finish "
                        "(Ctrl-C again to stop now)", len(self.in_flight), self.cfg.grace_period_s)

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, on_sigint)
        deadline: float | None = None
        try:
            while done < budget:
                if stop.is_set():
                    deadline = deadline or time.monotonic() + self.cfg.grace_period_s
                    if not self.in_flight or time.monotonic() > deadline:
                        break
                else:
                    while (len(self.in_flight) < self.cfg.parallel
                           and done + len(self.in_flight) < budget):
                        if self._start_trial() is optuna.trial.TrialState.COMPLETE:
                            done += 1  # answered from the cache
                            bar.update(1)
                ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
                if not ready:
                    continue
                state = self._advance(ready[0])
                if state is optuna.trial.TrialState.COMPLETE:
                    done += 1
                    bar.update(1)
                    bar.set_postfix_str(self._postfix(), refresh=True)
                elif state is optuna.trial.TrialState.FAIL:
                    self.n_failed += 1
                    if self.n_failed >= max_failures:
                        raise SearchError(f"{self.n_failed} trials failed; stopping. The last "
                                          "failure reason is in trials.csv and MLflow.")
        except BaseException:
            self._abandon_in_flight("driver interrupted")
            raise
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if stop.is_set():
            self._abandon_in_flight("interrupted: grace period over")
            raise KeyboardInterrupt

    def _start_trial(self) -> optuna.trial.TrialState | None:
        """Ask for a trial and start it, or answer it from the cache (then COMPLETE)."""
        trial = self.study.ask()
        try:
            choices = self.resolved.sample(trial)
        except Exception as exc:  # a space the checks let through: fatal, but leave no RUNNING
            self._fail(trial, f"sampling: {type(exc).__name__}: {exc}")
            raise SearchError(f"trial {trial.number} could not be sampled: {exc}") from exc
        trial.set_user_attr("choices", choices.flat())  # a trial that fails still shows them
        source = self._cached(choices)
        if source is not None:
            return self._answer_from_cache(trial, source)
        record = TrialRecord(trial.number, choices, seed=self.cfg.seed * 100_003 + trial.number)
        self.in_flight[self.executor.submit_compress(record)] = (trial, "compress")
        return None

    def _cached(self, choices: Choices) -> optuna.trial.FrozenTrial | None:
        """A COMPLETE trial with exactly these choices (samplers do propose repeats)."""
        key = _choices_key(choices.flat())
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if _choices_key(t.user_attrs.get("choices", {})) == key:
                return t
        return None

    def _answer_from_cache(self, trial: optuna.Trial,
                           source: optuna.trial.FrozenTrial) -> optuna.trial.TrialState:
        origin = source.user_attrs.get("cached_from", source.number)
        for key, value in source.user_attrs.items():
            if key not in ("baseline", "reference", "cached_from"):
                trial.set_user_attr(key, value)
        trial.set_user_attr("cached_from", origin)
        model = self.models_dir / f"trial-{source.number}.onnx"
        if model.exists():
            (self.models_dir / f"trial-{trial.number}.onnx").write_bytes(model.read_bytes())
        log.info("trial %d repeats trial %d's choices: answered from the cache", trial.number,
                 origin)
        return self._tell_complete(trial, list(source.values))

    def _advance(self, ref: ray.ObjectRef) -> optuna.trial.TrialState | None:
        trial, stage = self.in_flight.pop(ref)
        try:
            record: TrialRecord = ray.get(ref)
        except Exception as exc:  # the worker died or raised outside a stage
            return self._fail(trial, f"{stage}: {type(exc).__name__}: {str(exc)[-500:]}")
        if record.error:
            return self._fail(trial, record.error)
        if stage == "compress" and not self.executor.predicts:
            self.in_flight[self.executor.submit_measure(record)] = (trial, "measure")
            return None
        return self._complete(trial, record)

    def _fail(self, trial: optuna.Trial, reason: str) -> optuna.trial.TrialState:
        trial.set_user_attr("failure", reason)
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, reason)
        self._track(self.study._storage.get_trial(trial._trial_id))
        return optuna.trial.TrialState.FAIL

    def _complete(self, trial: optuna.Trial, record: TrialRecord) -> optuna.trial.TrialState:
        assert record.onnx_model is not None and record.latency is not None
        path = self.models_dir / f"trial-{trial.number}.onnx"
        try:
            path.write_bytes(record.onnx_model)
        except OSError as exc:  # a full disk: every later trial would fail the same way
            path.unlink(missing_ok=True)
            self._fail(trial, f"saving its model: {exc.strerror or exc}")
            raise SearchError(
                f"cannot write {path} ({exc.strerror or exc}); every completed trial is kept in "
                "the Optuna storage: free space and rerun the same command to resume"
            ) from None
        for key, value in _record_attrs(record).items():
            trial.set_user_attr(key, value)
        if record.latency.noisy:
            log.warning("trial %d: latency CV %.2f stayed above the profile's max_cv %.2f after a "
                        "repeat; flagged latency_noisy", trial.number, record.latency.cv,
                        self.profile.measure.max_cv)
        return self._tell_complete(trial, [record.accuracy, record.latency.median_ms])

    def _tell_complete(self, trial: optuna.Trial, values: list[float]) -> optuna.trial.TrialState:
        """Constraints, tell, MLflow child, and the front's hypervolume so far (step = trial)."""
        reference = _reference_accuracy(self.study)
        drop = reference - values[0] if reference is not None else 0.0
        trial.set_user_attr("accuracy_drop", drop)
        constraints = []
        if self.cfg.max_accuracy_drop is not None:
            constraints.append(drop - self.cfg.max_accuracy_drop)
        if self.cfg.max_latency_ms is not None:
            constraints.append(values[1] - self.cfg.max_latency_ms)
        if constraints:
            trial.set_user_attr("constraint_values", constraints)
        frozen = self.study.tell(trial, values)
        self._track(frozen)
        self.frame = trials_frame(self.study)  # once per trial: hypervolume and progress bar
        if not self.tracking_behind:  # during an outage only the final value is logged
            try:
                hv = hypervolume(self.frame)
                self.tracker.log_summary_metrics({"hypervolume": hv}, step=frozen.number)
            except Exception as exc:
                log.debug("hypervolume not logged: %s", exc)
        return optuna.trial.TrialState.COMPLETE

    def _track(self, trial: optuna.trial.FrozenTrial) -> None:
        """Log to MLflow; if the tracking server is down, go on (the result is in the Optuna
        storage and is logged when the study is finished or resumed)."""
        start = time.perf_counter()
        try:
            if not server_reachable(self.tracker.uri):  # fast: no MLflow retries
                if not self.tracking_behind:
                    log.warning("MLflow tracking server %s is unreachable; trials are logged "
                                "when it is back, at the end, or on a rerun",
                                redact(self.tracker.uri))
                self.tracking_behind = True
                return
            if self.tracking_behind:
                _catch_up(self.tracker, self.study)
                log.info("MLflow tracking server is back; missed trials logged")
                self.tracking_behind = False
            else:
                _log_frozen(self.tracker, trial, _reference_accuracy(self.study))
        except Exception as exc:
            self.tracking_behind = True
            log.warning("MLflow logging of trial %d failed (%s); it will be logged later",
                        trial.number, type(exc).__name__)
        finally:
            self.tracking_s += time.perf_counter() - start

    def _abandon_in_flight(self, reason: str) -> None:
        for ref, (trial, _) in list(self.in_flight.items()):
            ray.cancel(ref, force=True)
            try:
                trial.set_user_attr("failure", reason)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            except Exception:  # the storage may be what failed; nothing else to do
                pass
        self.in_flight.clear()

    def _postfix(self) -> str:
        df = self.frame
        best = best_speedup(df, self.cfg.report_drop)
        best_text = f"{best:.2f}x" if best else "n/a"
        return (f"front {int(df['on_front'].sum())}, best speedup within "
                f"{self.cfg.report_drop:g} pt {best_text}")


def _study_params(cfg: SearchConfig, profile: HardwareProfile) -> dict[str, Any]:
    return {
        "profile": profile.name, "task": cfg.task, "space": cfg.space, "sampler": cfg.sampler,
        "budget": cfg.budget, "seed": cfg.seed, "study_name": cfg.study_name,
        "storage": redact(cfg.storage), "parallel": cfg.parallel or "auto",
        "max_accuracy_drop": cfg.max_accuracy_drop, "max_latency_ms": cfg.max_latency_ms,
        **{k: str(v) for k, v in asdict(cfg.task_options()).items() if v is not None},
    }


def _noisy_note(df: pd.DataFrame, cfg: SearchConfig) -> str:
    """A warning when some measurements stayed noisy (column latency_noisy in trials.csv)."""
    noisy = df.loc[df["latency_noisy"].fillna(False).astype(bool), "trial"].tolist() if len(df) else []
    if not noisy:
        return ""
    return (f"; **warning: {len(noisy)} noisy measurement(s)** (trials "
            f"{', '.join(map(str, noisy))}: coefficient of variation above the profile's max_cv "
            "after a repeat; see latency_noisy in trials.csv, and rerun on a quieter machine)")


def _summary(cfg: SearchConfig, df: pd.DataFrame, front: pd.DataFrame, failed: list,
             best: float | None) -> str:
    """A short human summary of the study (summary.md)."""
    lines = [f"# {cfg.study_name}", "",
             f"- profile `{cfg.profile}`, task `{cfg.task}`, space `{cfg.space}`, "
             f"sampler `{cfg.sampler}`, seed {cfg.seed}",
             f"- {len(df)} completed trials of a budget of {cfg.budget}, {len(failed)} failed",
             f"- latency: {', '.join(sorted(set(df['latency_source'].dropna()))) or 'n/a'}"
             + _noisy_note(df, cfg),
             f"- best speedup within {cfg.report_drop:g} point(s) of the reference: "
             + (f"{best:.2f}x" if best else "n/a"), "", "| trial | accuracy % | latency ms | "
             "speedup | precisions |", "|---|---|---|---|---|"]
    for _, r in front.iterrows():
        lines.append(f"| {r['trial']} | {r['accuracy']:.2f} | {r['latency_ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['precisions']} |")
    return "\n".join(lines) + "\n"


def _warning_lines(warnings: list[str]) -> str:
    """The study's warnings (a teacher near chance, ...) at the end of summary.md."""
    return "".join(f"\n**warning**: {w}\n" for w in warnings)


def _write_outputs(study: optuna.Study, cfg: SearchConfig, tracker: Tracker, interrupted: bool,
                   profile: HardwareProfile, input_shape: tuple[int, ...],
                   providers: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = Path(cfg.output_dir)
    df = trials_frame(study)
    failed = [t for t in study.get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.FAIL]
    all_rows = df.assign(state="COMPLETE")
    if failed:
        fail_rows = pd.DataFrame([{"trial": t.number, "state": "FAIL",
                                   "failure": t.user_attrs.get("failure", ""),
                                   **{f"param.{k}": v
                                      for k, v in t.user_attrs.get("choices", {}).items()}}
                                  for t in failed])
        all_rows = pd.concat([all_rows, fail_rows], ignore_index=True).sort_values("trial")
    front = df[df["on_front"]].sort_values("latency_ms") if len(df) else df
    all_rows.to_csv(out / "trials.csv", index=False)
    # pareto.csv: the front, plus the baselines as reference rows (on_front tells which is which)
    shown = df[df["on_front"] | (df["baseline"] != "")].sort_values("latency_ms") if len(df) else df
    shown.to_csv(out / "pareto.csv", index=False)
    artifacts = [out / "pareto.csv", out / "trials.csv"]
    if len(df):
        title = f"{cfg.study_name}: {len(df)} trials, front of {len(front)}"
        artifacts.append(plot_front(df, out / "pareto.png", title))
        artifacts.append(write_html(df, out / "pareto.html", title))
    front_models = out / "front_models"
    front_models.mkdir(exist_ok=True)
    models: dict[int, Path] = {}
    for n in front["trial"]:
        src = out / "models" / f"trial-{n}.onnx"
        if src.exists():
            (front_models / src.name).write_bytes(src.read_bytes())
            models[int(n)] = front_models / src.name
    artifacts.append(front_models)
    best = best_speedup(df, cfg.report_drop) if len(df) else None
    config_path = out / "config.yaml"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings.update(storage=redact(cfg.storage), tracking_uri=redact(cfg.tracking_uri))
    config_path.write_text(yaml.safe_dump(settings, sort_keys=True))
    profile_path = out / "profile.yaml"
    profile_path.write_text(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
    artifacts += [config_path, profile_path]
    summary = out / "summary.md"
    summary.write_text(_summary(cfg, df, front, failed, best)
                       + _warning_lines(study.user_attrs.get("warnings", [])))
    artifacts.append(summary)
    if not server_reachable(tracker.uri):
        log.warning("MLflow tracking server %s is unreachable; the CSVs are written, and "
                    "rerunning the command completes the MLflow run", redact(tracker.uri))
        return df, shown
    try:
        _catch_up(tracker, study)  # trials missed during an outage or before a crash
        if len(df):  # the final value, at the last trial's step of the history
            tracker.log_summary_metrics({"hypervolume": hypervolume(df)},
                                        step=int(df["trial"].max()))
        tracker.mark_front(set(int(n) for n in front["trial"]))
        tracker.log_models(models, input_shape, providers)
        base = df.loc[df["reference"], "accuracy"] if len(df) else pd.Series(dtype=float)
        tracker.finish(
            {"front_size": len(front), "completed_trials": len(df), "failed_trials": len(failed),
             "best_speedup_within_drop": best,
             "baseline_accuracy": float(base.iloc[0]) if len(base) else None},
            artifacts, status="KILLED" if interrupted else "FINISHED",
        )
    except Exception as exc:  # results are safe in the Optuna storage and the CSVs
        log.warning("MLflow logging failed (%s: %s); the CSVs are written, and rerunning the "
                    "command completes the MLflow run", type(exc).__name__, redact(str(exc))[:300])
    return df, shown


def _check_latency_mode(cfg: SearchConfig, profile: HardwareProfile, measurable: bool,
                        why: str) -> None:
    """Fail before any work when the requested latency source cannot be had."""
    if cfg.latency == "measure" and not measurable and cfg.ray_address is None:
        raise ConfigError(
            f"--latency measure: profile {profile.name!r} cannot be measured on this machine "
            f"({why}); join a Ray cluster with a node that advertises {profile.resource!r} "
            "(--ray-address), or use --latency predict"
        )
    will_predict = cfg.latency == "predict" or (not measurable and cfg.ray_address is None)
    if will_predict and profile.latency_model is None:
        raise ConfigError(
            f"profile {profile.name!r} cannot be measured here ({why}) and has no "
            "latency_model to predict with; add one to the profile"
        )


def _latency_source(cfg: SearchConfig, profile: HardwareProfile, study: optuna.Study,
                    why: str, architecture: str) -> tuple[str, CalibrationChoice | None]:
    """Measured or predicted for the whole study (never mixed), and the calibration to use."""
    reachable = device_reachable(profile)
    if cfg.latency == "measure" and not reachable:
        raise ConfigError(f"--latency measure: no node of the Ray cluster advertises "
                          f"{profile.resource!r} ({why})")
    source = "measured" if cfg.latency != "predict" and reachable else "predicted"
    previous = study.user_attrs.get("latency_source")
    if previous and previous != source:
        raise ConfigError(
            f"study {cfg.study_name!r} has {previous} latencies; resuming it with {source} ones "
            f"would mix them. Pass --latency {'measure' if previous == 'measured' else 'predict'}"
            " or choose another --study-name"
        )
    study.set_user_attr("latency_source", source)
    if source == "measured":
        return source, None
    if profile.latency_model is None:
        raise ConfigError(f"profile {profile.name!r} cannot be measured from this process "
                          f"({why}) and has no latency_model to predict with; add one to the "
                          "profile, or join a Ray cluster whose node advertises "
                          f"{profile.resource!r}")
    return source, CalibrationStore(cache_dir(), profile).choose(architecture)


def _self_calibrate(study: optuna.Study, cfg: SearchConfig, profile: HardwareProfile,
                    tracker: Tracker, architecture: str, label: str) -> None:
    """Add this study's measurements to the profile's evidence and refit from all of it."""
    batch = profile.measure.batch_size
    samples = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        path = Path(cfg.output_dir) / "models" / f"trial-{t.number}.onnx"
        if path.exists() and t.values[1] > 0:
            samples.append(Measurement(
                architecture=architecture, label=label, source=f"{cfg.study_name}/{t.number}",
                costs=tuple(costs_from_onnx(path.read_bytes(), batch)), ms=t.values[1],
                batch=batch))
    if len(samples) < 5:
        return
    store = CalibrationStore(cache_dir(), profile)
    for note in store.add(samples):
        log.info("latency model for %s: %s", profile.name, note)
    cal = store.choose(architecture).calibration
    predicted = [predict_ms(m.costs, profile, cal) for m in samples]
    measured = [m.ms for m in samples]
    from scipy.stats import spearmanr

    errors = [abs(p / m - 1) for p, m in zip(predicted, measured, strict=True)]
    rho = float(spearmanr(predicted, measured).statistic)
    tracker.log_summary_metrics({"latency_model_spearman": rho,
                                 "latency_model_median_abs_error": float(np.median(errors))})
    log.info("latency model for %s on this study's %d measurements: Spearman %.2f, median "
             "error %.0f%% (evidence in %s)", profile.name, len(samples), rho,
             100 * float(np.median(errors)), store.dir)


def run_search(config: SearchConfig, *, show_progress: bool = True) -> StudyResult:
    """Run (or resume) a study until ``budget`` trials are COMPLETE; write its front."""
    start = time.perf_counter()
    profile = load_profile(config.profile)
    cfg = config.resolved(profile.name)
    space = load_space(cfg.space)
    measurable, why = measurable_here(profile)
    _check_latency_mode(cfg, profile, measurable, why)
    check_address(cfg.ray_address)
    check_tracking_uri(cfg.tracking_uri)
    check_task(cfg.task, cfg.task_options())
    root = Path(cfg.runs_root)
    ensure_writable(Path(cfg.output_dir), "output directory")
    if cfg.storage.startswith("sqlite:///") or cfg.tracking_uri is None:
        ensure_writable(root, "runs directory")
    with _driver_lock(Path(cfg.output_dir), cfg.study_name):
        return _run_locked(cfg, profile, space, measurable, why, start, show_progress)


def _run_locked(cfg: SearchConfig, profile: HardwareProfile, space: SearchSpace, measurable: bool,
                why: str, start: float, show_progress: bool) -> StudyResult:
    """Everything after validation, with the study's driver lock held."""
    root = Path(cfg.runs_root)
    tracking_uri = cfg.tracking_uri or default_tracking_uri(root)

    task = load_task(cfg.task, cfg.seed, cfg.task_options())
    info = task.teacher_info
    origin = (f"from {info['teacher']}" if info.get("teacher") else
              f"trained in {info['trained_s']:.0f} s" if info.get("trained_s") else "cached")
    log.info("teacher: test accuracy %.2f%% (%s)", info.get("test_accuracy", float("nan")), origin)
    resolved = resolve_space(space, profile, student_layers(task), model_facts(task))
    architecture = architecture_key(task.input_shape, task.teacher_state)
    arch_label = f"{task.name}/{type(task.make_model()).__name__}"
    constrained = cfg.max_accuracy_drop is not None or cfg.max_latency_ms is not None

    try:
        study = optuna.create_study(
            storage=open_storage(cfg.storage),
            sampler=make_sampler(cfg.sampler, cfg.seed, cfg.budget, constrained),
            study_name=cfg.study_name, directions=["maximize", "minimize"], load_if_exists=True,
        )
    except Exception as exc:
        raise ConfigError(f"cannot open the Optuna storage {redact(cfg.storage)}: "
                          f"{type(exc).__name__}: {redact(str(exc))}") from None
    _check_same_task(study, cfg)
    _fail_stale(study)
    if not study.get_trials(deepcopy=False):
        for i, (label, params) in enumerate(resolved.baselines()):
            study.enqueue_trial(params, user_attrs={"baseline": label, "reference": i == 0})
    study.set_metric_names(["accuracy", "latency_ms"])
    study.set_user_attr("max_accuracy_drop", cfg.max_accuracy_drop)
    study.set_user_attr("max_latency_ms", cfg.max_latency_ms)
    study.set_user_attr("warnings", [info["warning"]] if info.get("warning") else [])

    # artifacts beside the default local store; a tracking server keeps its own
    tracker = Tracker(tracking_uri, cfg.study_name,
                      root / "mlartifacts" if cfg.tracking_uri is None else None)
    tracker.log_study_params(_study_params(cfg, profile))
    started = connect(cfg.ray_address, profile, measurable)
    try:
        source, choice = _latency_source(cfg, profile, study, why, architecture)
        calibration = choice.calibration if choice is not None else None
        parallel, train_cpus = plan_parallel(cfg.parallel)
    except SearchError:
        if started:
            ray.shutdown()
        raise
    tracker.log_study_params({
        "latency_source": source,
        "calibration_fitted_on": choice.fitted_on if choice else 0,
        "calibration": choice.description if choice else "",
    })
    log.info("latency: %s on %s", source, profile.name if source == "measured" else
             f"{profile.name}'s latency model (device not reachable: {why}); calibration: "
             f"{choice.description if choice else ''}")
    interrupted = False
    stopped: SearchError | None = None
    phases = {"setup": time.perf_counter() - start}
    try:
        cpus = Executor.node_cpus()
        executor = Executor(task, profile, train_cpus=train_cpus, measure_cpus=cpus if started
                            else min(cpus, profile.measure.threads), calibration=calibration)
        log.info("%d trial(s) in flight, %d CPU(s) each", parallel, train_cpus)
        driver = _Driver(replace(cfg, parallel=parallel), study, resolved, executor, tracker,
                         profile, show_progress)
        loop_start = time.perf_counter()
        try:
            driver.run()
        except KeyboardInterrupt:
            interrupted = True
        except SearchError as exc:  # too many failures: still write what completed
            stopped = exc
        phases["trials"] = time.perf_counter() - loop_start
        phases["mlflow_trial_logging"] = driver.tracking_s
    finally:
        if started:
            ray.shutdown()
    finish_start = time.perf_counter()
    providers = list(dict.fromkeys([profile.measure.execution_provider, "CPUExecutionProvider"]))
    try:
        df, front = _write_outputs(study, cfg, tracker, interrupted, profile, task.input_shape,
                                   providers)
    except OSError as exc:  # a full or failing disk under the output directory
        raise stopped or SearchError(
            f"cannot write the study's outputs to {cfg.output_dir} ({exc.strerror or exc}); "
            f"every completed trial is kept in the Optuna storage {redact(cfg.storage)}: "
            "free space and rerun the same command to write them"
        ) from None
    if source == "measured" and profile.latency_model is not None:
        _self_calibrate(study, cfg, profile, tracker, architecture, arch_label)
    phases["finish"] = time.perf_counter() - finish_start
    if stopped is not None:
        raise stopped
    n_failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
    result = StudyResult(
        study_name=cfg.study_name, output_dir=Path(cfg.output_dir), trials=df, front=front,
        tracking_uri=tracking_uri, parent_run_id=tracker.parent_id,
        best_speedup=best_speedup(df, cfg.report_drop) if len(df) else None,
        n_failed=n_failed, wall_s=time.perf_counter() - start, interrupted=interrupted,
        phases=phases,
    )
    return result

