"""The Task record shared by every stage, and the options a task is built from.

A task holds its data in memory as tensors (``Split.x``, ``Split.y``): datasets
are read once, when the task is built (with DataLoader workers), and every trial
then slices tensors instead of re-reading files. Size the data accordingly
(CIFAR-10 at 32x32 is about 0.6 GB as float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CALIBRATION_CAP", "Loss", "Metric", "Split", "Task", "TaskOptions", "class_dim",
           "classification_loss", "top1_accuracy"]

# int8 calibration needs a few hundred samples; more only costs memory
CALIBRATION_CAP = 1024

Metric = Callable[[torch.Tensor, torch.Tensor], float]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_dim(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Where a classifier's classes are: dim 1 by PyTorch's convention (``(N, C)``, or
    ``(N, C, H, W)`` against ``(N, H, W)`` labels), or the last for a sequence tagger's
    ``(N, L, C)`` against ``(N, L)`` labels (one label per token)."""
    if logits.dim() >= 3 and logits.dim() == labels.dim() + 1 \
            and logits.shape[2:] != labels.shape[1:] and logits.shape[:-1] == labels.shape:
        return logits.dim() - 1
    return 1


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the classes where :func:`class_dim` finds them."""
    return F.cross_entropy(logits.movedim(class_dim(logits, labels), 1), labels)


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of labels whose class has the largest logit: one label per sample, or one
    per pixel or token for dense outputs (``(N, C, H, W)`` logits against ``(N, H, W)``
    labels: pixel accuracy; ``(N, L, C)`` against ``(N, L)``: token accuracy)."""
    hits = logits.argmax(class_dim(logits, labels)) == labels
    return 100.0 * int(hits.sum()) / max(1, labels.numel())


def logits_of(output: object) -> torch.Tensor:
    """The main logits of a classifier's output. In training mode torchvision's GoogLeNet
    and Inception v3 return named tuples with auxiliary logits, Hugging Face models an
    object with ``.logits``; training losses take the main head's. A dict must hold them
    under ``"logits"`` (or ``"out"``, as torchvision's segmenters do), first: the exported
    model's first output is what gets scored."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # torchvision's segmenters return {"out": ..., "aux": ...}
        first = next(iter(output), None)
        if first not in ("logits", "out"):
            raise TypeError(f"the model returned a dict with keys {list(output)}; its first "
                            "key must be 'logits' or 'out' (the ONNX model's first output is "
                            "scored)")
        return output[first]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}; a classifier must return "
                    "its logits (a tensor, a tuple whose first item they are, an output with "
                    ".logits, or a dict whose first key is 'logits')")


@dataclass(frozen=True)
class Split:
    """Inputs and integer labels of one data split, held in memory."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


_PATH_OPTIONS = ("data_dir", "teacher", "sparse_init")


@dataclass(frozen=True)
class TaskOptions:
    """What the command line says about the task; a task uses what applies to it.

    ``teacher``: a checkpoint to use instead of training (applied to any task,
    plugins included). ``teacher_epochs``: override a built-in's teacher
    training length (small values for tests and smoke runs).
    """

    data_dir: Path | None = None
    arch: str | None = None
    teacher: Path | None = None
    image_size: int | None = None
    teacher_epochs: int | None = None
    sparse_init: Path | None = None  # a pre-sparsified checkpoint for sparse transfer

    @classmethod
    def of(cls, settings: object) -> TaskOptions:
        """The task options among a study's settings (a ``SearchConfig``, or anything with
        these attributes), paths as paths."""
        values = {f.name: getattr(settings, f.name, None) for f in fields(cls)}
        return cls(**{k: Path(v) if v is not None and k in _PATH_OPTIONS else v
                      for k, v in values.items()})


@dataclass(frozen=True)
class Task:
    """A trained fp32 teacher and the data to fine-tune, calibrate and score it.

    ``make_model`` builds the untrained architecture (it must be picklable:
    a class or a module-level function or ``functools.partial``, since the
    task is shipped to Ray workers), so a student can be created and the
    teacher's weights loaded into it. ``metric(logits, labels)`` scores a
    model, higher is better (default: top-1 accuracy in percent).

    ``loss(output, y)``, for a task that is not classification (regression: float
    labels and, say, an MSE), is what fine-tuning and gradient saliencies minimise,
    and distillation then matches the teacher's outputs by mean squared error; None
    (the default) is classification: cross-entropy on int64 class indices, and
    distillation from the teacher's softened logits.
    """

    name: str
    make_model: Callable[[], nn.Module]
    teacher_state: dict[str, torch.Tensor]
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    teacher_info: dict[str, float | str] = field(default_factory=dict)
    metric: Metric = top1_accuracy
    calibration_cap: int = CALIBRATION_CAP
    # a pre-sparsified checkpoint of the same architecture, for sparse transfer: its zeros
    # are kept while the student is fine-tuned on this task
    sparse_state: dict[str, torch.Tensor] | None = None
    loss: Loss | None = None
    # what a person reads the metric as ("accuracy", "mAP", "mIoU", "R^2"): in points, higher
    # is better; the allowed drop is in its points
    metric_name: str = "accuracy"
    # what runs after the network outside the measured graph (a detector's decoding and
    # NMS), and what it costs: said beside every latency; "" when nothing does
    decoding: str = ""

    @property
    def training_loss(self) -> Loss:
        """The task's ``loss``, or cross-entropy for a classifier."""
        return self.loss or classification_loss

    @property
    def input_dtype(self) -> torch.dtype:
        """float32, or int64 for a model that takes token ids."""
        return self.train.x.dtype

    def example(self) -> torch.Tensor:
        """One all-zero input of the task's shape and type (0 is a valid token id too):
        what export and pruning trace with."""
        return torch.zeros(1, *self.input_shape, dtype=self.input_dtype)

    def teacher(self) -> nn.Module:
        """A fresh copy of the trained teacher in eval mode."""
        model = self.make_model()
        model.load_state_dict(self.teacher_state)
        return model.eval()

    def sparse_student(self) -> nn.Module:
        """A fresh model from the pre-sparsified checkpoint (sparse transfer)."""
        if self.sparse_state is None:
            raise ValueError(f"task {self.name!r} has no pre-sparsified checkpoint")
        model = self.make_model()
        model.load_state_dict(self.sparse_state)
        return model.eval()

    @property
    def calibration(self) -> torch.Tensor:
        """Inputs used to calibrate int8 activations: at most ``calibration_cap`` training
        inputs, a fixed random subset so every trial calibrates on the same ones."""
        x = self.train.x
        if len(x) <= self.calibration_cap:
            return x
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        return x[order[: self.calibration_cap]]

    def score(self, model: nn.Module, split: Split, batch_size: int = 256) -> float:
        """``metric`` of a PyTorch model on ``split`` (on the CPU, in eval mode)."""
        model.eval()
        with torch.no_grad():
            logits = torch.cat([logits_of(model(split.x[i : i + batch_size]))
                                for i in range(0, len(split), batch_size)])
        return self.metric(logits, split.y)
