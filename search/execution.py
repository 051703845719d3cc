"""Running trials as Ray tasks.

Two kinds of task: ``compress`` (prune, fine-tune, export, quantize, score) and
``measure``. A measurement needs the profile's device resource (``hw:<profile>``)
and holds it exclusively, so two measurements never share a device; on a local
Ray it also takes every CPU of the node, so it never runs beside training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray

from search.errors import ConfigError, TrialError
from search.latency.predict import Calibration
from search.pipeline import compress, measure, predict
from search.profiles import HardwareProfile
from search.record import TrialRecord
from search.tasks import Task

__all__ = ["Executor", "connect", "device_reachable"]


def _compress_remote(record: TrialRecord, task: Task, profile: HardwareProfile,
                     threads: int, calibration: Calibration | None) -> TrialRecord:
    """Compress and score; predict latency here too unless it will be measured."""
    try:
        record = compress(record, task, profile, threads)
        if calibration is not None:
            record = predict(record, profile, task.input_shape, calibration)
        return record
    except TrialError as exc:
        record.error = str(exc)
        return record


def _measure_remote(record: TrialRecord, profile: HardwareProfile,
                    input_shape: tuple[int, ...]) -> TrialRecord:
    record.node = ray.get_runtime_context().get_node_id()
    try:
        return measure(record, profile, input_shape)
    except TrialError as exc:
        record.error = str(exc)
        return record


def connect(address: str | None, profile: HardwareProfile, measurable: bool) -> bool:
    """Join the cluster at ``address`` or start a local Ray; True when started here."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "configure_logging": True,
    }
    if address is None:
        resources = {profile.resource: 1.0} if measurable and profile.resource else {}
        ray.init(resources=resources, **kwargs)
        return True
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, TimeoutError ...
        raise ConfigError(f"cannot join the Ray cluster at {address!r}: {exc}") from None
    return False


@dataclass
class Executor:
    """Submits the two stages of a trial with the resources each needs."""

    task: Task
    profile: HardwareProfile
    train_cpus: int
    measure_cpus: int
    calibration: Calibration | None = None  # set: predict latency; None: measure it

    def __post_init__(self) -> None:
        self._task_ref = ray.put(self.task)
        self._compress = ray.remote(_compress_remote).options(
            num_cpus=self.train_cpus, max_retries=1, name="compress"
        )
        resources = {self.profile.resource: 1.0} if self.profile.resource else {}
        self._measure = ray.remote(_measure_remote).options(
            num_cpus=self.measure_cpus, resources=resources, max_retries=1, name="measure"
        )

    def submit_compress(self, record: TrialRecord) -> ray.ObjectRef:
        return self._compress.remote(record, self._task_ref, self.profile, self.train_cpus,
                                     self.calibration)

    @property
    def predicts(self) -> bool:
        return self.calibration is not None

    def submit_measure(self, record: TrialRecord) -> ray.ObjectRef:
        return self._measure.remote(record, self.profile, self.task.input_shape)

    @staticmethod
    def node_cpus() -> int:
        """CPUs of the largest alive node: a task asking for more could never be scheduled."""
        sizes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        return max(1, int(max(sizes, default=1)))


def device_reachable(profile: HardwareProfile) -> bool:
    """Whether some node of the connected cluster advertises the profile's resource."""
    return bool(profile.resource) and ray.cluster_resources().get(profile.resource, 0) >= 1
