"""Running trials as Ray tasks.

Three kinds of task: ``screen`` (prune, export, quantize: the model whose
latency is the trial's; scored too when the trial has no fine-tune),
``measure``, and ``finetune`` (prune, distil, export, quantize, score) for the
trials that can still reach the front at their latency. A measurement needs the
profile's device resource (``hw:<profile>``) and holds it exclusively, so two
measurements never share a device; on a local Ray it also takes every CPU of
the node, so it never runs beside training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import ray

from search._base import faults as _faults
from search._base.errors import ConfigError, TrialError
from search._base.records import TrialRecord
from search.latency import Calibration
from search.profiles import HardwareProfile
from search.tasks import Task
from search.trial.pipeline import finetune, measure, predict, screen

__all__ = ["Executor", "LocalExecutor", "connect", "device_reachable", "plan_parallel"]

log = logging.getLogger("search")


def _screen_remote(record: TrialRecord, task: Task, profile: HardwareProfile,
                   threads: int, calibration: Calibration | None,
                   faults: str | None = None) -> TrialRecord:
    """The trial's model before fine-tuning; its latency predicted here unless measured."""
    try:
        with _faults.carried(faults):
            record = screen(record, task, profile, threads)
            if calibration is not None:
                record = predict(record, profile, task.input_shape, calibration)
            return record
    except TrialError as exc:
        record.error = str(exc)
        return record


def _finetune_remote(record: TrialRecord, task: Task, profile: HardwareProfile,
                     threads: int, faults: str | None = None) -> TrialRecord:
    try:
        with _faults.carried(faults):
            return finetune(record, task, profile, threads)
    except TrialError as exc:
        record.error = str(exc)
        return record


def _measure_here(record: TrialRecord, profile: HardwareProfile,
                  input_shape: tuple[int, ...]) -> TrialRecord:
    try:
        return measure(record, profile, input_shape)
    except TrialError as exc:
        record.error = str(exc)
        return record


def _measure_remote(record: TrialRecord, profile: HardwareProfile,
                    input_shape: tuple[int, ...], faults: str | None = None) -> TrialRecord:
    record.node = ray.get_runtime_context().get_node_id()
    with _faults.carried(faults):
        return _measure_here(record, profile, input_shape)


def plan_parallel(requested: int | None) -> tuple[int, int]:
    """Trials in flight and CPUs per trial for the connected cluster.

    By default one trial per node-sized slot, each with a whole node's CPUs;
    ``requested`` trials share the cluster's CPUs (at least one each).
    """
    node = Executor.node_cpus()
    total = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if requested is None:
        return max(1, total // node), node
    if requested > total:
        raise ConfigError(f"--parallel {requested} can never be scheduled: the Ray cluster has "
                          f"{total} CPUs and a trial needs at least one; use at most {total}")
    return requested, min(node, max(1, total // requested))


def connect(address: str | None, profile: HardwareProfile, measurable: bool,
            latency: str = "auto") -> bool:
    """Join the cluster at ``address`` or start a local Ray; True when started here.

    A Ray this process already runs (a notebook's ``ray.init()``) is used as it is;
    when it, or the joined cluster, has no node with the profile's device, ``latency``
    decides: ``measure`` refuses, ``auto`` warns that latencies will be predicted.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():
        if address is not None:
            log.warning("Ray is already initialized in this process, so the search runs on it "
                        "and does not join %r; call ray.shutdown() first to join that cluster",
                        address)
        _check_device(profile, latency, measurable, None)
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "configure_logging": True,
    }
    if address is None:
        resources = {profile.resource: 1.0} if measurable and profile.resource else {}
        # "local": always a new instance; with no address Ray joins the last `ray start`
        # cluster on this machine (/tmp/ray/ray_current_cluster), which refuses `resources`
        ray.init(address="local", resources=resources, **kwargs)
        return True
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, TimeoutError ...
        raise ConfigError(f"cannot join the Ray cluster at {address!r}: {exc}") from None
    _check_device(profile, latency, measurable, address)
    return False


def _check_device(profile: HardwareProfile, latency: str, measurable: bool,
                  address: str | None) -> None:
    """Refuse or warn when no node of the Ray in use has the device: otherwise ``auto``
    would quietly predict what the user expected measured."""
    if latency == "predict" or not profile.resource or device_reachable(profile):
        return
    resource = profile.resource
    if address is None:
        where = "this process's Ray (ray.init() was called before the search)"
        fix = (f"call ray.shutdown() before the search so that it starts its own Ray"
               f"{' with the device' if measurable else ''}, or start Ray with "
               f"ray.init(resources={{{resource!r}: 1}}) on a machine that has the device")
    else:
        where = f"the Ray cluster at {address!r}"
        fix = (f"start a node that has the device with `ray start --address <head> "
               f"--resources '{{\"{resource}\": 1}}'`")
    missing = f"no node of {where} advertises {resource!r}"
    could = " although this machine could measure it" if measurable else ""
    if latency == "measure":
        raise ConfigError(f"--latency measure: {missing}, so no trial could be measured{could}; "
                          f"{fix}")
    if profile.latency_model is None:
        raise ConfigError(f"{missing} and profile {profile.name!r} has no latency_model to "
                          f"predict with; {fix}, or add a latency_model to the profile")
    log.warning("%s%s: every latency of this study will be predicted with %s's latency model, not "
                "measured. To measure, %s; to choose prediction and silence this, pass "
                "--latency predict (latency='predict')", missing, could, profile.name, fix)


@dataclass
class Executor:
    """Submits the two stages of a trial with the resources each needs."""

    task: Task
    profile: HardwareProfile
    train_cpus: int
    measure_cpus: int
    calibration: Calibration | None = None  # set: predict latency; None: measure it
    # the driver's test hook (search/_base/faults.py), sent with each task: a joined cluster's
    # workers do not share the driver's environment
    faults: str = field(default_factory=lambda: os.environ.get(_faults.ENV, ""))

    def __post_init__(self) -> None:
        self._task_ref = ray.put(self.task)
        self._screen = ray.remote(_screen_remote).options(
            num_cpus=self.train_cpus, max_retries=1, name="screen"
        )
        # a fine-tune on a cluster with GPUs holds one, so parallel trials never share a card
        # unknowingly (the trial trains on CUDA when Ray gives it one: search._base.devices)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self._finetune = ray.remote(_finetune_remote).options(
            num_cpus=self.train_cpus, num_gpus=gpus, max_retries=1, name="finetune"
        )
        resources = {self.profile.resource: 1.0} if self.profile.resource else {}
        self._measure = ray.remote(_measure_remote).options(
            num_cpus=self.measure_cpus, resources=resources, max_retries=1, name="measure"
        )

    def submit_screen(self, record: TrialRecord) -> ray.ObjectRef:
        """Prune, export and quantize (and score when there is no fine-tune)."""
        return self._screen.remote(record, self._task_ref, self.profile, self.train_cpus,
                                   self.calibration, self.faults)

    def submit_finetune(self, record: TrialRecord) -> ray.ObjectRef:
        return self._finetune.remote(record, self._task_ref, self.profile, self.train_cpus,
                                     self.faults)

    @property
    def predicts(self) -> bool:
        return self.calibration is not None

    def submit_measure(self, record: TrialRecord) -> ray.ObjectRef:
        return self._measure.remote(record, self.profile, self.task.input_shape, self.faults)

    @staticmethod
    def wait(handles: list[ray.ObjectRef], timeout: float | None) -> list[ray.ObjectRef]:
        """The handles that are ready (at most one), waiting at most ``timeout`` seconds."""
        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        return ready

    @staticmethod
    def result(handle: ray.ObjectRef) -> Any:
        return ray.get(handle)

    @staticmethod
    def cancel(handle: ray.ObjectRef) -> None:
        ray.cancel(handle, force=True)

    def submit_on_device(self, fn: Callable[..., Any], *args: Any) -> ray.ObjectRef:
        """Run ``fn(*args)`` holding the device as a measurement does (re-measuring a front)."""
        resources = {self.profile.resource: 1.0} if self.profile.resource else {}
        return ray.remote(fn).options(num_cpus=self.measure_cpus, resources=resources,
                                      max_retries=1, name="remeasure").remote(*args)

    @staticmethod
    def node_cpus() -> int:
        """CPUs of the largest alive node: a task asking for more could never be scheduled."""
        sizes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        return max(1, int(max(sizes, default=1)))


def device_reachable(profile: HardwareProfile) -> bool:
    """Whether some node of the connected cluster advertises the profile's resource."""
    return bool(profile.resource) and ray.cluster_resources().get(profile.resource, 0) >= 1


@dataclass
class LocalExecutor:
    """The same stages run in this process, one after the other, no Ray.

    For debugging a task (a breakpoint in a stage stops here, not in a Ray
    worker) and for testing the driver's logic quickly. Latency is predicted
    with ``calibration`` when given, else measured here.
    """

    task: Task
    profile: HardwareProfile
    calibration: Calibration | None = None
    threads: int = 1

    @property
    def predicts(self) -> bool:
        return self.calibration is not None

    def _done(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # a worker that died, in Ray's terms
            future.set_exception(exc)
        return future

    def submit_screen(self, record: TrialRecord) -> Future:
        return self._done(_screen_remote, record, self.task, self.profile, self.threads,
                          self.calibration)

    def submit_finetune(self, record: TrialRecord) -> Future:
        return self._done(_finetune_remote, record, self.task, self.profile, self.threads)

    def submit_measure(self, record: TrialRecord) -> Future:
        return self._done(_measure_here, record, self.profile, self.task.input_shape)

    def submit_on_device(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._done(fn, *args)

    @staticmethod
    def wait(handles: list[Future], timeout: float | None) -> list[Future]:
        return [h for h in handles if h.done()][:1]

    @staticmethod
    def result(handle: Future) -> Any:
        return handle.result()

    @staticmethod
    def cancel(handle: Future) -> None:
        handle.cancel()
