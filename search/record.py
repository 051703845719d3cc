"""The plain records a trial passes from stage to stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Choices", "Layer", "LatencyStats", "TrialRecord"]


@dataclass(frozen=True)
class Layer:
    """A compressible layer: its PyTorch module name and its ONNX op type."""

    name: str
    op_type: str


@dataclass
class Choices:
    """Everything one trial decided; defaults are the uncompressed fp32 model."""

    unstructured_sparsity: float = 0.0
    structured_ratio: float = 0.0
    epochs: int = 0
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.5
    precisions: dict[str, str] = field(default_factory=dict)
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    activation_symmetric: bool = False
    calibration_samples: int = 128

    def flat(self) -> dict[str, Any]:
        """Flat, readable parameters (``precision.<layer>`` for the plan)."""
        out = {k: v for k, v in asdict(self).items() if k != "precisions"}
        out.update({f"precision.{k}": v for k, v in self.precisions.items()})
        return out


@dataclass
class LatencyStats:
    """Latency of one model at the profile's batch size, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    cv: float
    runs: int
    source: str  # "measured" or "predicted"
    device: str
    provider: str = ""
    noisy: bool = False  # cv stayed above the profile's max_cv after a repeat


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
    onnx_model: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)
    node: str | None = None  # Ray node that measured the latency
    error: str | None = None
