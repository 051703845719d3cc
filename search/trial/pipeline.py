"""One trial as a straight line of stages over one plain record.

    prune -> fine-tune (distil) -> export ONNX -> precision plan -> accuracy in ORT

Latency is a separate stage (:func:`measure`) because it runs as its own Ray
task holding the device exclusively, never beside training.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import onnx
import torch
import torch_pruning as tp
from torch import nn

from search._base import faults as _faults
from search._base.errors import TrialError
from search._base.names import scored
from search._base.records import Layer, TrialRecord
from search.latency import Calibration, measure_latency, predict_latency
from search.profiles import HardwareProfile, measurable_here
from search.space.resolve import ModelFacts
from search.tasks import Task
from search.trial.compress import (
    FakeQuant,
    Sparsifier,
    apply_precision_plan,
    compressible_layers,
    count_zero_fraction,
    distill,
    export_onnx,
    onnx_node_names,
    prune_structured,
    teacher_outputs,
)
from search.trial.compress._layers import observe
from search.trial.compress.blocks import droppable_blocks, rank_blocks, remove_blocks
from search.trial.compress.distill import feature_taps
from search.trial.compress.exact_int8 import exact_int8_twin, int8_saturates_here
from search.trial.compress.heads import prune_heads
from search.trial.compress.prune import (
    attention_modules,
    depth_segments,
    output_layers,
    recalibrate_batchnorm,
)
from search.trial.compress.sparsity import one_shot_scores
from search.trial.evaluate import onnx_score

__all__ = ["compress", "finetune", "measure", "model_facts", "predict", "prune_student",
           "run_trial", "screen", "student_layers"]

_SCREEN_CALIBRATION = 16  # int8 ranges of a model measured for latency only
_RANKINGS: dict[str, list[str]] = {}  # this process's block rankings, per starting model
_RANKING_SAMPLES = 256
# this process's kept teacher values, per distillation loss, of one task at a time
_TEACHER_OUTPUTS: dict[str, dict[str, torch.Tensor] | None] = {}
_TEACHER_OUTPUTS_BYTES = 256 * 2**20  # the most kept per loss; beyond, the teacher runs


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


def student_layers(task: Task) -> list[Layer]:
    """The layers a trial's student has before pruning (attention split into projections)."""
    teacher = task.teacher()
    prune_heads(teacher, 0.0, always=True)
    return compressible_layers(teacher, task.example())


def model_facts(task: Task) -> ModelFacts:
    """What the task's model offers the space: droppable blocks, attention, sparse init,
    BatchNorm (bn_scale's signal) and feature taps (what feature distillation compares)."""
    teacher = task.teacher()
    example = task.example()
    return ModelFacts(droppable_blocks=len(droppable_blocks(teacher, example)),
                      attention=bool(attention_modules(teacher)),
                      sparse_init=task.sparse_state is not None,
                      batchnorm=any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                    for m in teacher.modules()),
                      feature_taps=bool(feature_taps(teacher, example)),
                      embedding=_has_embedding(teacher, example))


def _has_embedding(model: nn.Module, example: torch.Tensor) -> bool:
    """One output layer whose input is a vector per sample or per token (what relation
    distillation compares), not a detector's dense heads or a per-pixel convolution."""
    names = output_layers(model, example)
    if len(names) != 1:
        return False
    seen: list[int] = []
    observe(model, {names[0]: model.get_submodule(names[0])},
            lambda name, x, out: seen.append(x.dim() if x is not None else 0), example)
    return bool(seen) and seen[-1] in (2, 3)


def _fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Names, shapes and up to 1024 evenly spaced values of every tensor: tells two
    checkpoints apart in milliseconds, whatever their size (a ViT-B's 344 MB included)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in state.items():
        flat = tensor.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // 1024)].cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(picked.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _block_ranking(task: Task, student: nn.Module, init: str) -> list[str]:
    """The starting model's droppable blocks, least important first.

    Ranked on a fixed sample of the training set, so the ranking depends on
    the starting model only: it is computed once per worker process, not in
    every trial (it was most of the prune stage: 0.65 of about 1 s on the
    default task), and "drop 2 blocks" names the same blocks in every trial.
    """
    state = task.sparse_state if init == "sparse" and task.sparse_state else task.teacher_state
    key = f"{task.name}:{init}:{_fingerprint(state)}"
    if key not in _RANKINGS:
        order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))
        if len(_RANKINGS) >= 8:  # a long-lived worker that served many tasks
            _RANKINGS.clear()
        _RANKINGS[key] = rank_blocks(student, task.train.x[order[:_RANKING_SAMPLES]])
    return _RANKINGS[key]


def _teacher_outputs(task: Task, loss: str) -> dict[str, torch.Tensor] | None:
    """What distilling with ``loss`` reads of the teacher on the training inputs, computed
    once per worker process, task and loss (as the block ranking is) instead of in every
    batch of every fine-tune."""
    task_key = f"{task.name}:{_fingerprint(task.teacher_state)}:{_fingerprint({'x': task.train.x})}"
    if any(not key.startswith(task_key + ":") for key in _TEACHER_OUTPUTS):
        _TEACHER_OUTPUTS.clear()  # another task's: they may be large
    key = f"{task_key}:{loss}"
    if key not in _TEACHER_OUTPUTS:
        _TEACHER_OUTPUTS[key] = teacher_outputs(task.teacher(), task.train.x,
                                                _TEACHER_OUTPUTS_BYTES, loss)
    return _TEACHER_OUTPUTS[key]


def _prune(record: TrialRecord, task: Task, profile: HardwareProfile) -> tuple[nn.Module,
                                                                               Sparsifier]:
    """Layer dropping, channel/head removal, then weight sparsity (or the checkpoint's zeros)."""
    c = record.choices
    torch.manual_seed(record.seed)
    student = task.sparse_student() if c.init == "sparse" else task.teacher()
    example = task.example()
    probe = task.train.x[torch.randperm(len(task.train))[:256]]
    # depth segments of the whole model: "early" names the same layers whichever blocks go
    segments = depth_segments(student, example) if c.segment_ratios else None
    ranking = _block_ranking(task, student, c.init) if c.drop_blocks > 0 else []
    record.dropped_blocks = remove_blocks(student, ranking[:c.drop_blocks])
    prune_structured(student, example, c.segment_ratios or c.structured_ratio,
                     profile.channel_multiple, importance=c.structured_importance,
                     head_ratio=c.head_ratio, data=task.train, loss=task.training_loss,
                     segments=segments)
    prune_heads(student, 0.0, always=True)  # attention as separate q/k/v/out projections
    macs, params = tp.utils.count_ops_and_params(student, example)
    record.macs, record.params = int(macs), int(params)
    if c.init == "sparse":
        sparsifier = Sparsifier.from_zeros(student)
    else:
        sparsifier = Sparsifier(student, sparsity=c.unstructured_sparsity,
                                criterion=c.unstructured_criterion, scope=c.unstructured_scope,
                                pattern=c.sparsity_pattern)
        gradual = c.unstructured_criterion == "movement" and c.epochs > 0
        scores = None
        if sparsifier.active and not gradual:
            scores = one_shot_scores(student, c.unstructured_criterion, task.train,
                                     seed=record.seed, loss=task.training_loss)
        sparsifier.start(scores, gradual=gradual)
    if record.dropped_blocks or c.structured_ratio > 0 or c.head_ratio > 0 or sparsifier.active:
        # one pass: the statistics are a cumulative average over batches, so a second pass
        # over the same inputs (as before) gave the same values for twice the compute
        recalibrate_batchnorm(student, probe)
    return student, sparsifier


def prune_student(record: TrialRecord, task: Task, profile: HardwareProfile) -> nn.Module:
    """The trial's student after its prune stage, exactly as :func:`compress` builds it
    (no fine-tune): what the conformance tests and the preflight probe check."""
    with _stage(record, "prune"):
        student, sparsifier = _prune(record, task, profile)
        sparsifier.finish()
    return student.eval()


def _export_and_quantize(record: TrialRecord, task: Task, profile: HardwareProfile,
                         student: nn.Module, layers: list[Layer], *,
                         calibration_samples: int | None = None) -> bytes:
    c = record.choices
    plan = {layer.name: c.precisions.get(layer.name, "fp32") for layer in layers}
    with _stage(record, "export"):
        fp32 = export_onnx(student, task.input_shape, task.input_dtype, precisions=plan)
        names = onnx_node_names(onnx.load_from_string(fp32), layers)
    with _stage(record, "quantize"):
        if calibration_samples is not None:
            c = replace(c, calibration_samples=min(c.calibration_samples, calibration_samples))
        final = apply_precision_plan(fp32, plan, names, c, task.calibration,
                                     reduce_range=profile.int8.reduce_range, seed=record.seed)
        record.layer_precisions = plan
    return final


def _score(record: TrialRecord, task: Task, final: bytes, threads: int) -> None:
    with _stage(record, "evaluate"):
        # what an int8 device computes, not what this CPU's saturating kernels would
        scored_model = exact_int8_twin(final) if int8_saturates_here() else final
        record.accuracy = onnx_score(scored_model, task.val, task.metric, threads=threads)
        record.test_accuracy = onnx_score(scored_model, task.test, task.metric, threads=threads)
    record.onnx_model = final
    record.size_mb = len(final) / 1e6


def screen(record: TrialRecord, task: Task, profile: HardwareProfile,
           threads: int = 1) -> TrialRecord:
    """The trial's model before any fine-tuning: pruned, exported and quantized.

    Its structure and precision plan decide its latency, and fine-tuning
    changes neither, so this model's latency is the trial's latency. A trial
    without fine-tuning ends here, scored; one with fine-tuning is not scored
    (only its latency is wanted), and its int8 ranges come from a few samples.
    """
    torch.set_num_threads(threads)
    with _stage(record, "prune"):
        student, sparsifier = _prune(record, task, profile)
        if record.choices.epochs == 0:  # a gradual (movement) schedule has not started yet
            sparsifier.finish()
        layers = compressible_layers(student, task.example())
        record.sparsity = count_zero_fraction(student)
    if record.choices.epochs > 0:
        record.onnx_model = _export_and_quantize(record, task, profile, student, layers,
                                                 calibration_samples=_SCREEN_CALIBRATION)
        return record
    _score(record, task, _export_and_quantize(record, task, profile, student, layers), threads)
    return record


def finetune(record: TrialRecord, task: Task, profile: HardwareProfile,
             threads: int = 1) -> TrialRecord:
    """Prune (again, deterministically), fine-tune with distillation, export, quantize, score.

    With ``record.needed_accuracy`` set, the validation accuracy after each
    epoch decides whether to go on: a fine-tune that cannot plausibly reach
    it stops there and ``record.stopped`` says why.
    """
    torch.set_num_threads(threads)
    c = record.choices
    with _stage(record, "prune"):
        student, sparsifier = _prune(record, task, profile)
        layers = compressible_layers(student, task.example())
    with _stage(record, "train"):
        hooks: list = [sparsifier]
        fake = None
        if c.qat and c.epochs > 0:
            int8 = [layer.name for layer in layers if c.precisions.get(layer.name) == "int8"]
            fake = FakeQuant(student, int8, per_channel=c.per_channel,
                             activation_symmetric=c.activation_symmetric)
            hooks.append(fake)
        after_epoch = _EarlyStop(record, task, c.epochs)
        after_epoch.start(student)
        distill(student, task.teacher(), task.train, epochs=c.epochs, lr=c.lr,
                temperature=c.temperature, alpha=c.alpha, seed=record.seed,
                loss=c.distill_loss, loss_weight=c.distill_weight, task_loss=task.loss, hooks=hooks,
                after_epoch=after_epoch,
                teacher_values=_teacher_outputs(task, c.distill_loss))
        if record.stopped:
            record.onnx_model = None
            return record
        sparsifier.finish()
        if fake is not None:
            fake.finish()
        record.sparsity = count_zero_fraction(student)
    _score(record, task, _export_and_quantize(record, task, profile, student, layers), threads)
    return record


class _EarlyStop:
    """After each epoch: stop when even an optimistic projection misses the needed accuracy.

    The projection gives every remaining epoch the larger of the last epoch's
    gain (the first epoch's from the pruned student's accuracy) and one point,
    plus a point for the noise of one validation pass; gains shrink as a
    fine-tune converges, so this over-estimates. Optuna's pruners compare one
    objective against other trials at the same step; here the bar comes from
    the two-objective front at this trial's latency, so the rule is our own.
    """

    def __init__(self, record: TrialRecord, task: Task, epochs: int) -> None:
        self.record, self.task, self.epochs = record, task, epochs
        self.history: list[float] = []

    def start(self, student: nn.Module) -> None:
        """The accuracy the first epoch's gain is measured from (only when it can matter)."""
        if self.record.needed_accuracy is not None and self.epochs > 1:
            self.history.append(self.task.score(student, self.task.val))

    def __call__(self, epoch: int, student: nn.Module) -> bool:
        accuracy = self.task.score(student, self.task.val)
        self.record.epoch_accuracy.append(accuracy)
        self.history.append(accuracy)
        needed = self.record.needed_accuracy
        if needed is None:
            return False
        gain = self.history[-1] - self.history[-2] if len(self.history) > 1 else 0.0
        remaining = self.epochs - epoch - 1
        reach = accuracy + remaining * max(gain, 1.0) + 1.0
        if reach < needed:
            metric = self.task.metric_name
            self.record.stopped = (
                f"after epoch {epoch + 1} of {self.epochs}: {scored(accuracy, metric)} on "
                f"validation, at most about {scored(reach, metric)} reachable in its "
                f"{self.epochs} epochs, {scored(needed, metric)} "
                "needed to reach the front (if it is faster than every trial within 10 "
                "points, it gets a turn at the refinement's longer fine-tune)")
            return True
        return False


def compress(record: TrialRecord, task: Task, profile: HardwareProfile,
             threads: int = 1) -> TrialRecord:
    """Prune, fine-tune, export, quantize and score one trial's model (no early stopping)."""
    if record.choices.epochs > 0:
        return finetune(record, task, profile, threads)
    return screen(record, task, profile, threads)


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
