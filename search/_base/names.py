"""Every name the package's parts must agree on, declared once.

Each vocabulary is one ``Literal`` (what the schemas and type hints use) with its tuple
derived from it (what code iterates and error messages list): the space schema, the trial
record, the profiles and the modules that implement a name all read it from here, so a
name added or renamed here is added or renamed everywhere.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ACTIVATION_TYPES", "CALIBRATION_METHODS", "CHANNEL_IMPORTANCES", "DISTILL_LOSSES",
    "GRANULARITIES", "INTEGER_PRECISIONS", "LATENCY_SOURCES", "PRECISIONS", "QUANT_MODES",
    "RUNNABLE_PRECISIONS", "SEGMENTS", "SPARSITY_CRITERIA", "SPARSITY_SCOPES",
    "STRUCTURED_GRANULARITIES", "STUDENT_INITS", "WEIGHT_TYPES",
    "ActivationType", "CalibrationMethod", "ChannelImportance", "DistillLoss", "Granularity",
    "LatencySource", "Precision", "QuantMode", "Segment", "SparsityCriterion", "SparsityScope",
    "StructuredGranularity", "StudentInit", "WeightType", "scored",
]

# Precisions, least to most compressed.
Precision = Literal["fp32", "bf16", "fp16", "int16", "int8", "int4"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# what the trial pipeline can produce and score here (bf16 convolutions have no kernel in ONNX
# Runtime's CPU provider, which scores every trial)
RUNNABLE_PRECISIONS: tuple[str, ...] = tuple(p for p in PRECISIONS if p != "bf16")
# quantized to integers with scales and zero points (QDQ or dynamic); int4 is weight-only
INTEGER_PRECISIONS: tuple[str, ...] = ("int16", "int8")

# how int8 quantizes: calibrated QDQ, or ranges computed at run time
QuantMode = Literal["static", "dynamic"]
QUANT_MODES: tuple[str, ...] = get_args(QuantMode)
ActivationType = Literal["uint8", "int8", "int16"]
ACTIVATION_TYPES: tuple[str, ...] = get_args(ActivationType)
WeightType = Literal["int8", "uint8"]
WEIGHT_TYPES: tuple[str, ...] = get_args(WeightType)
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)
# how many layers share one precision in a plan
Granularity = Literal["auto", "layer", "block", "stage", "ends", "uniform"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)

# weight sparsity: which weights are zeroed, and over what
SparsityCriterion = Literal["magnitude", "movement", "fisher"]
SPARSITY_CRITERIA: tuple[str, ...] = get_args(SparsityCriterion)
SparsityScope = Literal["global", "layer"]
SPARSITY_SCOPES: tuple[str, ...] = get_args(SparsityScope)
# where a student starts: the teacher, or a pre-sparsified checkpoint (sparse transfer)
StudentInit = Literal["teacher", "sparse"]
STUDENT_INITS: tuple[str, ...] = get_args(StudentInit)

# channel pruning: which channels go, and one ratio or one per depth segment
ChannelImportance = Literal["magnitude", "bn_scale", "taylor", "lamp"]
CHANNEL_IMPORTANCES: tuple[str, ...] = get_args(ChannelImportance)
StructuredGranularity = Literal["uniform", "segment"]
STRUCTURED_GRANULARITIES: tuple[str, ...] = get_args(StructuredGranularity)
# thirds of a network's compute, in the order it runs (channel pruning per depth segment)
Segment = Literal["early", "middle", "late"]
SEGMENTS: tuple[str, ...] = get_args(Segment)

# what a fine-tune distils from the teacher
DistillLoss = Literal["response", "feature", "relation"]
DISTILL_LOSSES: tuple[str, ...] = get_args(DistillLoss)

# where a latency came from
LatencySource = Literal["measured", "predicted"]
LATENCY_SOURCES: tuple[str, ...] = get_args(LatencySource)


def scored(value: float, metric: str = "accuracy") -> str:
    """A value of the task's metric as a log line writes it: ``98.61%`` for top-1
    accuracy, ``83.65 mAP`` for any other metric (its points are not a percentage of
    samples)."""
    return f"{value:.2f}%" if metric == "accuracy" else f"{value:.2f} {metric}"
