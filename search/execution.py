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
from search.pipeline import compress, measure
from search.profiles import HardwareProfile
from search.record import TrialRecord
from search.tasks import Task

__all__ = ["Executor", "connect"]


def _compress_remote(record: TrialRecord, task: Task, profile: HardwareProfile,
                     threads: int) -> TrialRecord:
    try:
        return compress(record, task, profile, threads)
    except TrialError as exc:
        record.error = str(exc)
        return record


def _measure_remote(record: TrialRecord, profile: HardwareProfile,
                    input_shape: tuple[int, ...]) -> TrialRecord:
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
        return self._compress.remote(record, self._task_ref, self.profile, self.train_cpus)

    def submit_measure(self, record: TrialRecord) -> ray.ObjectRef:
        return self._measure.remote(record, self.profile, self.task.input_shape)

    @staticmethod
    def local_cpus() -> int:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
