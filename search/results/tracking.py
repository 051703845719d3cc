"""MLflow tracking, written by the study driver only (the one ``import mlflow``).

One parent run per study; one nested child run per trial, logged with one
``log_batch`` call. A resumed study reuses its parent run and never logs a
trial twice.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.onnx
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from search._base.errors import ConfigError
from search._base.redact import redact
from search.config import DEFAULT_EXPERIMENT
from search.results._mlflow_store import seed_sqlite_store


def _configure_mlflow() -> None:
    """MLflow's defaults that do not suit a study driver, set (once, where unset) when a
    Tracker is made rather than on import."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO when imported
    # MLflow prints "View run ... at: <tracking URI>" for every run it ends on a server, with
    # any user:password the URI carries; our own summary names the server (redacted) once.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # By default MLflow retries a failed request 7 times with exponential backoff (minutes)
    # and waits 120 s for an answer; the driver would stall that long per trial while a
    # server is down. Trial results are safe in the Optuna storage and logged later.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

__all__ = ["EXPERIMENT", "Tracker", "default_tracking_uri"]

log = logging.getLogger("search")
EXPERIMENT = DEFAULT_EXPERIMENT  # SearchConfig.experiment_name, $MLFLOW_EXPERIMENT_NAME beat it
_STUDY_TAG = "search.study.run"
_TRIAL_TAG = "search.trial"


def default_tracking_uri(root: Path) -> str:
    """The shared SQLite store under ``root`` (``./search-runs`` by default)."""
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def _metric_items(metrics: Mapping[str, float | None], step: int = 0) -> list[Metric]:
    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, step) for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))]


@contextmanager
def _quiet_provider_check() -> Iterator[None]:
    """MLflow loads every logged model to check its example and warns, once per model, that
    the declared GPU providers are missing here: said once by us instead."""
    logger = logging.getLogger("mlflow.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (which ``mlflow.onnx.log_model`` needs) at ``uri`` for the
    block only. ``mlflow.set_tracking_uri`` also writes $MLFLOW_TRACKING_URI; left behind, it
    would send the next study of this process (a notebook) to this study's store."""
    from mlflow.tracking._tracking_service import utils

    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = getattr(utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


class Tracker:
    """The study's MLflow parent run and its children."""

    def __init__(self, tracking_uri: str, study_name: str, artifact_root: Path | None,
                 experiment: str = EXPERIMENT) -> None:
        _configure_mlflow()
        self.uri = tracking_uri
        seed_sqlite_store(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = artifact_root.resolve().as_uri() if artifact_root else None
                experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                experiment_id = found.experiment_id
        except Exception as exc:
            raise ConfigError(f"cannot use the MLflow tracking store {redact(tracking_uri)}: "
                              f"{type(exc).__name__}: {redact(str(exc))}") from None
        self.experiment_id = experiment_id
        self.study_name = study_name
        self.parent_id = self._find_or_create_parent()
        self.logged: dict[int, str] = {}  # trial -> child run, fully logged
        self._partial: dict[int, str] = {}  # trial -> child run created but not completed
        self.metric = "accuracy"  # the task's metric: what each child run's "accuracy" holds
        self.refresh()

    def _find_or_create_parent(self) -> str:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{_STUDY_TAG}` = '{self.study_name}'",
            max_results=1,
        )
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=self.study_name, tags={_STUDY_TAG: self.study_name}
        )
        return run.info.run_id

    def refresh(self) -> None:
        """Re-read which trials have a child run: after an outage, a run the server created
        may never have been confirmed to us. A child not ended is completed, not duplicated."""
        for number, (run_id, status) in self._children().items():
            if status == "RUNNING":
                if number not in self.logged:
                    self._partial[number] = run_id
            else:
                self.logged[number] = run_id
                self._partial.pop(number, None)

    def _children(self) -> dict[int, tuple[str, str]]:
        found: dict[int, tuple[str, str]] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                max_results=1000, page_token=token,
            )
            for run in page:
                if _TRIAL_TAG in run.data.tags:
                    found[int(run.data.tags[_TRIAL_TAG])] = (run.info.run_id, run.info.status)
            token = page.token
            if not token:
                return found

    def log_study_params(self, params: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.parent_id).data.params
        new = [Param(k, redact(str(v))) for k, v in params.items() if k not in existing]
        if new:
            self.client.log_batch(self.parent_id, params=new)

    def log_trial(self, number: int, params: Mapping[str, Any], metrics: Mapping[str, float | None],
                  tags: Mapping[str, str], failed: bool = False) -> None:
        """One child run per trial, in one batch; a trial already logged is skipped, and one
        whose logging was cut off (server down, driver killed) is completed in the same run."""
        if number in self.logged:
            return
        run_id = self._partial.get(number)
        if run_id is None:
            run_id = self.client.create_run(
                self.experiment_id,
                run_name=f"trial-{number}",
                tags={"mlflow.parentRunId": self.parent_id, _TRIAL_TAG: str(number)},
            ).info.run_id
            self._partial[number] = run_id
        self.client.log_batch(
            run_id,
            metrics=_metric_items(metrics),
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=[RunTag(k, redact(str(v))) for k, v in tags.items()],
        )
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        self.logged[number] = self._partial.pop(number)

    def log_summary_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        """Metrics of the parent run; ``step`` makes a history (hypervolume per trial)."""
        self.client.log_batch(self.parent_id, metrics=_metric_items(metrics, step))

    def mark_front(self, front: set[int]) -> None:
        for number, run_id in self.logged.items():
            self.client.set_tag(run_id, "on_front", str(number in front).lower())

    def log_models(self, models: Mapping[int, Path], input_shape: tuple[int, ...],
                   providers: list[str] | None = None) -> None:
        """Log each front model as an MLflow ONNX model (signature, input example) in the
        parent run, ready to register from the UI; its child run gets the model URI."""
        import onnx
        import onnxruntime as ort
        from mlflow.models import infer_signature

        from search._base.ort import example_input

        declared = providers or ["CPUExecutionProvider"]
        missing = [p for p in declared if p not in ort.get_available_providers()]
        if missing and models:
            log.info("front models are logged for %s; this machine lacks %s, so MLflow checks "
                     "them on the CPU (expected away from the device)", declared[0],
                     ", ".join(missing))
        with (_fluent_tracking_uri(self.uri), mlflow.start_run(run_id=self.parent_id),
              _quiet_provider_check()):
            for number, path in sorted(models.items()):
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                example = example_input(session, (1, *input_shape))  # float or token ids
                output = session.run(None, {"input": example})[0]
                info = mlflow.onnx.log_model(
                    onnx.load(str(path)), name=f"trial-{number}", input_example=example,
                    signature=infer_signature(example, output), save_as_external_data=False,
                    pip_requirements=["onnxruntime", "onnx"],
                    onnx_execution_providers=declared,
                )
                if number in self.logged:
                    self.client.set_tag(self.logged[number], "model_uri", info.model_uri)

    def finish(self, metrics: Mapping[str, float | None], artifacts: list[Path],
               status: str = "FINISHED") -> None:
        self.client.log_batch(self.parent_id, metrics=_metric_items(metrics))
        for path in artifacts:
            if path.is_dir():
                self.client.log_artifacts(self.parent_id, str(path), path.name)
            elif path.exists():
                self.client.log_artifact(self.parent_id, str(path))
        self.client.set_terminated(self.parent_id, status=status)
