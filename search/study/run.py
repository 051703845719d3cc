"""``run_search``: check everything, open the study, wire the loop, refine, write outputs.

Only this process writes to the Optuna storage and to MLflow (the loop is
:mod:`search.study.driver`, the files :mod:`search.results.outputs`, the latency source
:mod:`search.study.latency_source`). A trial's result is in the Optuna storage
before anything else is done with it, so a study can be interrupted at any
moment and resumed by rerunning the same command.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray

from search._base.attrs import StudyKey, TrialKey, fail_stale
from search._base.errors import ConfigError, SearchError
from search._base.redact import redact
from search.checks import check_inputs, prepare_directories
from search.config import SearchConfig
from search.latency import Calibration
from search.latency.calibration import CalibrationChoice, architecture_key
from search.profiles import HardwareProfile
from search.results.outputs import write_outputs
from search.results.pareto import (
    best_speedup,
)
from search.results.tracking import Tracker, default_tracking_uri
from search.results.trial_logging import MlflowTrialLogger
from search.space.resolve import ResolvedSpace, resolve_space
from search.space.schema import SearchSpace
from search.space.starts import baselines
from search.study.driver import Driver
from search.study.execution import Executor, connect, plan_parallel
from search.study.latency_source import latency_source, self_calibrate
from search.study.preflight import preflight
from search.study.refine import refine_epochs, refine_front, remeasure_front
from search.study.sampling import make_sampler
from search.study.storage import create_or_load_study, open_storage
from search.tasks import Task, TaskOptions, check_task, load_task, top1_accuracy
from search.trial.pipeline import model_facts, student_layers

__all__ = ["StudyResult", "run_search"]

log = logging.getLogger("search")


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
    metric: str = "accuracy"  # the task's metric, what the accuracy columns hold
    n_pruned: int = 0  # stopped early: could not reach the front at their latency
    phases: dict[str, float] = field(default_factory=dict)  # setup, trials, finish (seconds)
    storage: str = ""  # the Optuna storage URL, password redacted: safe to print or share
    _storage_url: str = field(default="", repr=False)  # the real one, for load_study()

    def load_study(self) -> optuna.Study:
        """The study in its Optuna storage (journal files and passwords included), e.g. for
        ``optuna.visualization`` or to inspect trials; metric names and constraints as stored."""
        return optuna.load_study(study_name=self.study_name,
                                 storage=open_storage(self._storage_url or self.storage))


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
    task = {"task": cfg.task, **{k: str(v) for k, v in asdict(TaskOptions.of(cfg)).items()
                                 if v is not None}}
    if cfg.batch_size is not None:  # latencies at another batch size are another problem
        task["batch_size"] = str(cfg.batch_size)
    previous = study.user_attrs.get(StudyKey.TASK)
    if previous is not None and previous != task:
        changed = sorted(k for k in set(previous) | set(task) if previous.get(k) != task.get(k))
        raise ConfigError(
            f"study {cfg.study_name!r} was run with {', '.join(f'{k}={previous.get(k)}' for k in changed)}; "
            f"resuming it with {', '.join(f'{k}={task.get(k)}' for k in changed)} would mix two "
            "problems in one front. Use the original settings or another --study-name"
        )
    study.set_user_attr(StudyKey.TASK, task)


def _refine(cfg: SearchConfig, study: optuna.Study, resolved: ResolvedSpace, executor: Executor,
            parallel: int) -> None:
    """Refine the front's members, then re-measure the front with the baselines."""
    longest = resolved.space.distillation.epochs.high
    if cfg.refine > 0 and longest > 0:
        refine_front(study, executor, cfg, epochs=refine_epochs(cfg, longest), parallel=parallel)
    remeasure_front(study, executor, Path(cfg.output_dir))


def _study_params(cfg: SearchConfig, profile: HardwareProfile) -> dict[str, Any]:
    return {
        "profile": profile.name, "task": cfg.task, "space": cfg.space, "sampler": cfg.sampler,
        "budget": cfg.budget, "seed": cfg.seed, "study_name": cfg.study_name,
        "storage": redact(cfg.storage), "parallel": cfg.parallel or "auto",
        "max_accuracy_drop": cfg.max_accuracy_drop, "max_latency_ms": cfg.max_latency_ms,
        "batch_size": profile.measure.batch_size,
        **{k: str(v) for k, v in asdict(TaskOptions.of(cfg)).items() if v is not None},
    }


def run_search(config: SearchConfig, *, show_progress: bool = True) -> StudyResult:
    """Run (or resume) a study until ``budget`` trials are done; refine and write its front.

    Progress and INFO messages (teacher cached or trained, latency source, trials
    stopped early) reach a notebook too: without any logging set up by the
    caller, they go to stderr for the duration of the call.
    """
    with _messages_shown():
        return _run_search(config, show_progress)


@contextmanager
def _messages_shown() -> Iterator[None]:
    ours = logging.getLogger("search")
    if ours.handlers or logging.getLogger().handlers:  # the CLI or the caller configured it
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("search: %(message)s"))
    level = ours.level
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.setLevel(level)


def _run_search(config: SearchConfig, show_progress: bool) -> StudyResult:
    start = time.perf_counter()
    checked = check_inputs(config)
    cfg = checked.config
    check_task(cfg.task, TaskOptions.of(cfg))
    prepare_directories(cfg)
    with _driver_lock(Path(cfg.output_dir), cfg.study_name), warnings.catch_warnings():
        # our samplers' experimental options and their independent-sampling notes are ours
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*independent sampler.*")
        return _run_locked(cfg, checked.profile, checked.space, checked.measurable,
                           checked.why, start, show_progress)


def _run_locked(cfg: SearchConfig, profile: HardwareProfile, space: SearchSpace, measurable: bool,
                why: str, start: float, show_progress: bool) -> StudyResult:
    """Everything after validation, with the study's driver lock held."""
    root = Path(cfg.runs_root)
    tracking_uri = cfg.tracking_uri or default_tracking_uri(root)
    task = _load_teacher(cfg)
    architecture = architecture_key(task.input_shape, task.teacher_state)
    arch_label = f"{task.name}/{type(task.make_model()).__name__}"
    # checked against the profile and the model before anything is stored
    resolved = resolve_space(space, profile, student_layers(task), model_facts(task))
    study, resolved = _open_study(cfg, task, profile, resolved)

    # artifacts beside the default local store; a tracking server keeps its own
    tracker = Tracker(tracking_uri, cfg.study_name,
                      root / "mlartifacts" if cfg.tracking_uri is None else None, cfg.experiment_name)
    tracker.metric = task.metric_name
    tracker.log_study_params({**_study_params(cfg, profile), "metric": task.metric_name,
                              "decoding": task.decoding or "none"})
    started = connect(cfg.ray_address, profile, measurable, cfg.latency)
    try:
        source, choice = latency_source(cfg, profile, study, why, architecture)
        parallel, train_cpus = plan_parallel(cfg.parallel)
    except SearchError:
        if started:
            ray.shutdown()
        raise
    calibration = _log_latency_source(
        tracker, profile, source, choice,
        "as asked (--latency predict)" if cfg.latency == "predict" else
        f"device not reachable: {why}")
    phases = {"setup": time.perf_counter() - start}
    try:
        cpus = Executor.node_cpus()
        executor = Executor(task, profile, train_cpus=train_cpus, measure_cpus=cpus if started
                            else min(cpus, profile.measure.threads), calibration=calibration)
        log.info("%d trial(s) in flight, %d CPU(s) each", parallel, train_cpus)
        interrupted, stopped = _run_trials(cfg, study, resolved, executor, tracker, parallel,
                                           show_progress, phases)
    finally:
        if started:
            ray.shutdown()
    finish_start = time.perf_counter()
    providers = list(dict.fromkeys([profile.measure.execution_provider, "CPUExecutionProvider"]))
    try:
        df, front = write_outputs(study, cfg, tracker, interrupted, profile, task.input_shape,
                                   providers)
    except OSError as exc:  # a full or failing disk under the output directory
        raise stopped or SearchError(
            f"cannot write the study's outputs to {cfg.output_dir} ({exc.strerror or exc}); "
            f"every completed trial is kept in the Optuna storage {redact(cfg.storage)}: "
            "free space and rerun the same command to write them"
        ) from None
    if source == "measured" and profile.latency_model is not None:
        self_calibrate(study, cfg, profile, tracker, architecture, arch_label)
    phases["finish"] = time.perf_counter() - finish_start
    if stopped is not None:
        raise stopped
    states = optuna.trial.TrialState
    return StudyResult(
        study_name=cfg.study_name, output_dir=Path(cfg.output_dir), trials=df, front=front,
        tracking_uri=tracking_uri, parent_run_id=tracker.parent_id,
        best_speedup=best_speedup(df, cfg.report_drop) if len(df) else None,
        n_failed=len(study.get_trials(deepcopy=False, states=(states.FAIL,))),
        wall_s=time.perf_counter() - start, interrupted=interrupted, metric=task.metric_name,
        n_pruned=len(study.get_trials(deepcopy=False, states=(states.PRUNED,))),
        phases=phases, storage=redact(cfg.storage), _storage_url=cfg.storage,
    )


def _log_latency_source(tracker: Tracker, profile: HardwareProfile, source: str,
                        choice: CalibrationChoice | None, reason: str) -> Calibration | None:
    """Say (and log to the parent run) whether latency is measured or predicted, and with
    which calibration; returns that calibration for the predictions."""
    tracker.log_study_params({
        "latency_source": source,
        "calibration_fitted_on": choice.fitted_on if choice else 0,
        "calibration": choice.description if choice else "",
    })
    log.info("latency: %s on %s", source, profile.name if source == "measured" else
             f"{profile.name}'s latency model ({reason}); calibration: "
             f"{choice.description if choice else ''}")
    return choice.calibration if choice is not None else None


def _load_teacher(cfg: SearchConfig) -> Task:
    """The task, its teacher trained or read from the cache (said which, with its accuracy)."""
    task = load_task(cfg.task, cfg.seed, TaskOptions.of(cfg))
    info = task.teacher_info
    origin = (f"from {info['teacher']}" if info.get("teacher") else
              f"trained in {info['trained_s']:.0f} s" if info.get("trained_s") else "cached")
    log.info("teacher: test %s %.2f (%s)", task.metric_name, info.get("test_accuracy", float("nan")),
             origin)
    return task


def _open_study(cfg: SearchConfig, task: Task, profile: HardwareProfile,
                resolved: ResolvedSpace) -> tuple[optuna.Study, ResolvedSpace]:
    """Create or resume the Optuna study: same task, preflight once, stale trials failed,
    baselines and seeds enqueued on a new one. Returns it with the space preflight left."""
    constrained = cfg.max_accuracy_drop is not None or cfg.max_latency_ms is not None
    try:
        study = create_or_load_study(open_storage(cfg.storage),
                                      make_sampler(cfg.sampler, cfg.seed, cfg.budget, constrained),
                                      cfg.study_name)
    except Exception as exc:
        raise ConfigError(f"cannot open the Optuna storage {redact(cfg.storage)}: "
                          f"{type(exc).__name__}: {redact(str(exc))}") from None
    _check_same_task(study, cfg)
    # preflight once per study: a resumed study keeps the space it started with
    outcomes = dict(study.user_attrs.get(StudyKey.PREFLIGHT, {}))
    tried = len(outcomes)
    resolved, removed, notes = preflight(task, profile, resolved, outcomes)
    if len(outcomes) != tried:
        study.set_user_attr(StudyKey.PREFLIGHT, outcomes)
    for note in notes:
        log.info("preflight: %s", note)
    for note in removed:
        log.warning("preflight: %s", note)
    fail_stale(study)
    if not study.get_trials(deepcopy=False):
        for i, (label, params) in enumerate(baselines(resolved)):
            study.enqueue_trial(params, user_attrs={TrialKey.BASELINE: label,
                                                    TrialKey.REFERENCE: i == 0})
        # the seeds follow once the baselines are measured (search.study.driver)
    study.set_metric_names([task.metric_name, "latency_ms"])
    study.set_user_attr(StudyKey.METRIC, {"name": task.metric_name, "decoding": task.decoding})
    if task.decoding:
        log.info("latency: the network's alone; %s", task.decoding)
    small = _eval_set_warning(task, cfg.report_drop)
    if small:
        log.warning("%s", small)
    shown = [w for w in (task.teacher_info.get("warning"), small) if w]
    study.set_user_attr(StudyKey.WARNINGS, shown + removed)
    return study, resolved


def _eval_set_warning(task: Task, drop: float) -> str | None:
    """Say when the validation split is too small to tell ``drop`` points of top-1 apart from
    chance: the fastest point within the drop is then chosen by a handful of samples.
    Several standard errors of fp32's accuracy should fit in the allowed drop."""
    if task.metric is not top1_accuracy or drop <= 0:
        return None
    n = len(task.val.y)
    p = min(max(float(task.teacher_info.get("test_accuracy", 90.0)) / 100, 0.01), 0.99)
    se = 100 * math.sqrt(p * (1 - p) / n)
    if drop >= 3 * se:
        return None
    return (f"the validation split has {n} samples: one point of accuracy is {n / 100:.1f} "
            f"samples, and fp32's accuracy has a standard error of about {se:.2f} points, so "
            f"the allowed drop of {drop:g} point(s) is {drop / se:.1f} standard errors; the "
            "point chosen within it may miss it on test (a larger validation split, or a "
            "larger --max-accuracy-drop, resolves it)")


def _run_trials(cfg: SearchConfig, study: optuna.Study, resolved: ResolvedSpace,
                executor: Executor, tracker: Tracker, parallel: int, show_progress: bool,
                phases: dict[str, float]) -> tuple[bool, SearchError | None]:
    """The budget's trials, then refinement; returns (interrupted, what stopped the study).

    Both end cleanly so that the outputs are still written; ``phases`` gets their times.
    """
    interrupted = False
    stopped: SearchError | None = None
    logger = MlflowTrialLogger(tracker)
    driver = Driver(cfg, study, resolved, executor, callbacks=[logger], parallel=parallel,
                    show_progress=show_progress)
    logger.frame = lambda _study: driver.frame  # refreshed by the driver before callbacks
    loop_start = time.perf_counter()
    try:
        driver.run()
    except KeyboardInterrupt:
        interrupted = True
    except SearchError as exc:  # too many failures: still write what completed
        stopped = exc
    phases["trials"] = time.perf_counter() - loop_start
    if not interrupted and stopped is None:
        refine_start = time.perf_counter()
        try:
            _refine(cfg, study, resolved, executor, parallel)
        except KeyboardInterrupt:
            interrupted = True
        phases["refine"] = time.perf_counter() - refine_start
    phases["mlflow_trial_logging"] = logger.seconds
    phases.update({f"stage_{k}": v for k, v in driver.stage_time.items()})
    return interrupted, stopped
