"""One trial as a straight line of stages over one plain record.

    prune -> fine-tune (distil) -> export ONNX -> precision plan -> accuracy in ORT

Latency is a separate stage (:func:`measure`) because it runs as its own Ray
task holding the device exclusively, never beside training.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import torch
import torch_pruning as tp

from search import _faults
from search.compress import (
    apply_precision_plan,
    compressible_layers,
    count_zero_fraction,
    distill,
    export_onnx,
    onnx_node_names,
    prune_structured,
    prune_unstructured,
)
from search.compress.prune import recalibrate_batchnorm, remove_masks
from search.errors import TrialError
from search.evaluate import onnx_accuracy
from search.latency import measure_latency
from search.latency.predict import Calibration, predict_latency
from search.profiles import HardwareProfile, measurable_here
from search.record import TrialRecord
from search.tasks import Task

__all__ = ["compress", "measure", "predict", "run_trial"]


@contextmanager
def _stage(record: TrialRecord, name: str) -> Iterator[None]:
    """Time a stage into ``record.timings``; name the stage in any error it raises."""
    start = time.perf_counter()
    try:
        _faults.inject(name, record.number)
        yield
    except TrialError:
        raise
    except Exception as exc:
        raise TrialError(name, f"{type(exc).__name__}: {exc}") from exc
    finally:
        record.timings[name] = record.timings.get(name, 0.0) + time.perf_counter() - start


def compress(record: TrialRecord, task: Task, profile: HardwareProfile,
             threads: int = 1) -> TrialRecord:
    """Prune, fine-tune, export, quantize and score one trial's model."""
    torch.set_num_threads(threads)
    choices = record.choices
    with _stage(record, "prune"):
        torch.manual_seed(record.seed)
        student = task.teacher()
        layers = compressible_layers(student)
        example = torch.zeros(1, *task.input_shape)
        prune_structured(student, example, choices.structured_ratio, profile.channel_multiple)
        macs, params = tp.utils.count_ops_and_params(student, example)
        record.macs, record.params = int(macs), int(params)
        prune_unstructured(student, choices.unstructured_sparsity)
        if choices.structured_ratio > 0 or choices.unstructured_sparsity > 0:
            order = torch.randperm(len(task.train))[:512]
            recalibrate_batchnorm(student, task.train.x[order])
    with _stage(record, "train"):
        distill(student, task.teacher(), task.train, epochs=choices.epochs, lr=choices.lr,
                temperature=choices.temperature, alpha=choices.alpha, seed=record.seed)
        remove_masks(student)
        record.sparsity = count_zero_fraction(student)
    with _stage(record, "export"):
        fp32 = export_onnx(student, task.input_shape)
        names = onnx_node_names(onnx.load_from_string(fp32), layers)
    with _stage(record, "quantize"):
        plan = {layer.name: choices.precisions.get(layer.name, "fp32") for layer in layers}
        final = apply_precision_plan(fp32, plan, names, choices, task.calibration,
                                     reduce_range=profile.int8.reduce_range, seed=record.seed)
        record.layer_precisions = plan
    with _stage(record, "evaluate"):
        record.accuracy = onnx_accuracy(final, task.val, threads=threads)
        record.test_accuracy = onnx_accuracy(final, task.test, threads=threads)
    record.onnx_model = final
    record.size_mb = len(final) / 1e6
    return record


def measure(record: TrialRecord, profile: HardwareProfile,
            input_shape: tuple[int, ...]) -> TrialRecord:
    """Measure the trial's final model on this machine, as the profile says."""
    if record.onnx_model is None:
        raise TrialError("measure", "the trial has no model to measure")
    with _stage(record, "measure"):
        ok, why = measurable_here(profile)
        if not ok:
            raise TrialError("measure", f"this node cannot measure {profile.name}: {why}")
        record.latency = measure_latency(record.onnx_model, profile, input_shape)
    return record


def predict(record: TrialRecord, profile: HardwareProfile, input_shape: tuple[int, ...],
            calibration: Calibration | None = None) -> TrialRecord:
    """Predict the trial's latency on the profile's device from its final model."""
    if record.onnx_model is None:
        raise TrialError("predict", "the trial has no model to predict")
    with _stage(record, "predict"):
        record.latency = predict_latency(record.onnx_model, profile, input_shape, calibration)
    return record


def run_trial(record: TrialRecord, task: Task, profile: HardwareProfile,
              threads: int = 1) -> TrialRecord:
    """Every stage in one process (for tests and benchmarks; studies use Ray)."""
    return measure(compress(record, task, profile, threads), profile, task.input_shape)
