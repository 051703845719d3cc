"""The plain records a trial passes from stage to stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from search._base.names import (
    INTEGER_PRECISIONS,
    ActivationType,
    CalibrationMethod,
    ChannelImportance,
    DistillLoss,
    LatencySource,
    QuantMode,
    SparsityCriterion,
    SparsityScope,
    StudentInit,
    WeightType,
)

__all__ = ["Choices", "Layer", "LatencyStats", "TrialRecord"]


@dataclass(frozen=True)
class Layer:
    """A compressible layer: its PyTorch module name and its ONNX op type."""

    name: str
    op_type: str


@dataclass
class Choices:
    """Everything one trial decided; defaults are the uncompressed fp32 model."""

    # where the student starts: the teacher, or a pre-sparsified checkpoint (sparse transfer)
    init: StudentInit = "teacher"
    # weight sparsity: unstructured share, or an N:M pattern ("2:4")
    sparsity_pattern: str = "unstructured"
    unstructured_sparsity: float = 0.0
    unstructured_criterion: SparsityCriterion = "magnitude"
    unstructured_scope: SparsityScope = "global"
    # structure: residual blocks dropped, channels and attention heads removed
    drop_blocks: int = 0
    structured_ratio: float = 0.0  # with segment_ratios: the largest of them
    segment_ratios: dict[str, float] = field(default_factory=dict)  # per SEGMENTS; {}: uniform
    structured_importance: ChannelImportance = "magnitude"
    head_ratio: float = 0.0
    # fine-tune with distillation (0 epochs: one-shot post-training)
    epochs: int = 0
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.5
    distill_loss: DistillLoss = "response"
    distill_weight: float = 1.0
    # precision plan and integer quantization
    precisions: dict[str, str] = field(default_factory=dict)
    quant_mode: QuantMode = "static"
    qat: bool = False
    activation_type: ActivationType = "uint8"
    weight_type: WeightType = "int8"
    per_channel: bool = True
    activation_symmetric: bool = False
    calibration_method: CalibrationMethod = "minmax"
    calibration_samples: int = 128

    def flat(self) -> dict[str, Any]:
        """Flat, readable parameters (``precision.<layer>`` for the plan,
        ``structured_ratio.<segment>`` for channel ratios per depth segment)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("precisions", "segment_ratios")}
        out.update({f"structured_ratio.{k}": v for k, v in self.segment_ratios.items()})
        out.update({f"precision.{k}": v for k, v in self.precisions.items()})
        return out

    def applied(self) -> dict[str, Any]:
        """:meth:`flat` without the settings that had no effect on the model (int8 settings
        when no layer is integer, distillation settings without a fine-tune, ...): what
        trials.csv and MLflow show, and what tells two trials' models apart."""
        return {k: v for k, v in self.flat().items() if k not in self._idle()}

    def _idle(self) -> set[str]:
        idle: set[str] = set()
        if self.epochs == 0:
            idle |= {"lr", "temperature", "alpha", "distill_loss", "distill_weight", "qat"}
        elif self.distill_loss == "response":
            idle.add("distill_weight")
        if not any(p in INTEGER_PRECISIONS for p in self.precisions.values()):
            idle |= {"quant_mode", "qat", "activation_type", "weight_type", "per_channel",
                     "activation_symmetric", "calibration_method", "calibration_samples"}
        elif self.quant_mode == "dynamic":
            idle |= {"qat", "activation_type", "activation_symmetric", "calibration_method",
                     "calibration_samples"}
        if self.structured_ratio == 0:
            idle.add("structured_importance")
        if self.init != "teacher":
            idle |= {"sparsity_pattern", "unstructured_sparsity", "unstructured_criterion",
                     "unstructured_scope"}
        elif self.sparsity_pattern == "unstructured" and self.unstructured_sparsity == 0:
            idle |= {"unstructured_criterion", "unstructured_scope"}
        elif self.sparsity_pattern != "unstructured":
            idle |= {"unstructured_sparsity", "unstructured_scope"}
        return idle


@dataclass
class LatencyStats:
    """Latency of one model at the profile's batch size, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    cv: float
    runs: int
    source: LatencySource
    device: str
    provider: str = ""
    noisy: bool = False  # cv stayed above the profile's max_cv after a repeat
    batch_size: int = 1  # inputs per inference the latency is for


@dataclass
class TrialRecord:
    """One trial: choices in, results out. Plain data so it crosses Ray untouched."""

    number: int
    choices: Choices
    seed: int = 0
    accuracy: float | None = None  # top-1 % on the validation split, from ONNX Runtime
    test_accuracy: float | None = None
    latency: LatencyStats | None = None
    size_mb: float | None = None
    params: int | None = None
    macs: int | None = None
    sparsity: float | None = None  # achieved share of zero weights in Conv/Gemm
    layer_precisions: dict[str, str] = field(default_factory=dict)
    dropped_blocks: list[str] = field(default_factory=list)
    onnx_model: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)
    node: str | None = None  # Ray node that measured the latency
    error: str | None = None
    # multi-fidelity: the accuracy a fine-tune must reach to matter (set by the driver), the
    # validation accuracy after each epoch, and why a fine-tune was stopped early
    needed_accuracy: float | None = None
    epoch_accuracy: list[float] = field(default_factory=list)
    stopped: str | None = None
