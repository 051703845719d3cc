"""Search spaces: the schema of ``spaces/*.yaml`` and where the built-in ones are.

Resolving a space against a profile and a model is :mod:`search.space.resolve`;
sampling a resolved space is :mod:`search.study.sampling` (the only module that calls
``trial.suggest_*``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, model_validator

from search._base.names import (
    ActivationType,
    CalibrationMethod,
    ChannelImportance,
    DistillLoss,
    Granularity,
    Precision,
    QuantMode,
    SparsityCriterion,
    SparsityScope,
    StructuredGranularity,
    StudentInit,
    WeightType,
)
from search._base.paths import builtin_dir
from search._base.schema import Strict, load_model, resolve_builtin

__all__ = [
    "SPACES_DIR",
    "FloatRange",
    "IntRange",
    "SearchSpace",
    "available_spaces",
    "load_space",
]

SPACES_DIR = builtin_dir("spaces")
Auto = Literal["auto"]  # what pays on the profile
All = Literal["all"]  # everything the profile can run, paying or not (research)


class FloatRange(Strict):
    """A float dimension; ``low == high`` fixes it."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("a log range cannot have a step")
        return self


class IntRange(Strict):
    """An integer dimension; ``low == high`` fixes it."""

    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


def _renamed(data: Any, renamed: dict[str, str]) -> Any:  # noqa: ANN401
    """A key that was renamed is named with its new name (the one trials.csv, MLflow and
    Optuna's parameters use), rather than refused as merely unknown."""
    if isinstance(data, dict):
        old = [k for k in renamed if k in data]
        if old:
            raise ValueError("; ".join(f"{k!r} is now called {renamed[k]!r} (the name trials.csv, "
                                       "MLflow and the trial parameters use)" for k in old))
    return data


def _unit(low: float, high: float, step: float | None = 0.05) -> FloatRange:
    return FloatRange(low=low, high=high, step=step)


_PATTERN = re.compile(r"^(unstructured|(\d+):(\d+))$")


class PruningSpace(Strict):
    """Where the student starts, weight sparsity, and what structure is removed."""

    init: list[StudentInit] | Auto = "auto"
    sparsity_pattern: list[str] | Auto | All = "auto"
    # auto: sampled only where the profile's runtime has sparse kernels
    unstructured_sparsity: FloatRange | Auto = "auto"
    unstructured_criterion: list[SparsityCriterion] = list(get_args(SparsityCriterion))
    unstructured_scope: list[SparsityScope] = list(get_args(SparsityScope))
    drop_blocks: IntRange = IntRange(low=0, high=1)
    structured_ratio: FloatRange = _unit(0.0, 0.6)
    # uniform: one channel ratio for the whole model; segment: one per third of its compute
    # (early, middle, late in the order it runs), each from structured_ratio's range
    structured_granularity: StructuredGranularity = "uniform"
    structured_importance: list[ChannelImportance] = list(get_args(ChannelImportance))
    head_ratio: FloatRange = FloatRange(low=0.0, high=0.5, step=0.25)

    @model_validator(mode="after")
    def _fractions(self) -> PruningSpace:
        for name in ("unstructured_sparsity", "structured_ratio", "head_ratio"):
            r = getattr(self, name)
            if r == "auto":
                continue
            if r.low < 0 or r.high >= 1:
                raise ValueError(f"{name} must lie in [0, 1), got [{r.low}, {r.high}]")
        if self.drop_blocks.low < 0:
            raise ValueError("drop_blocks must be >= 0")
        if self.sparsity_pattern not in ("auto", "all"):
            for p in self.sparsity_pattern:
                m = _PATTERN.match(p)
                if m is None or (m.group(2) and not 0 < int(m.group(2)) < int(m.group(3))):
                    raise ValueError(f"sparsity_pattern {p!r}: use 'unstructured' or 'N:M' "
                                     "with 0 < N < M, e.g. '2:4'")
        for name in ("init", "sparsity_pattern", "unstructured_criterion", "unstructured_scope",
                     "structured_importance"):
            if getattr(self, name) == []:
                raise ValueError(f"{name} must list at least one value")
        return self


class DistillationSpace(Strict):
    """Fine-tuning with distillation; 0 epochs means one-shot post-training."""

    epochs: IntRange = IntRange(low=0, high=3)
    lr: FloatRange = FloatRange(low=1e-4, high=1e-2, log=True)
    temperature: FloatRange = FloatRange(low=1.0, high=8.0)
    alpha: FloatRange = _unit(0.0, 1.0)
    distill_loss: list[DistillLoss] = list(get_args(DistillLoss))
    distill_weight: FloatRange = FloatRange(low=0.1, high=10.0, log=True)  # feature, relation

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:  # noqa: ANN401
        return _renamed(data, {"loss": "distill_loss", "loss_weight": "distill_weight"})

    @model_validator(mode="after")
    def _sane(self) -> DistillationSpace:
        if self.epochs.low < 0:
            raise ValueError("epochs must be >= 0")
        if self.temperature.low <= 0:
            raise ValueError("temperature must be > 0")
        if self.alpha.low < 0 or self.alpha.high > 1:
            raise ValueError("alpha must lie in [0, 1]")
        if self.distill_loss == []:
            raise ValueError("distill_loss must list at least one value")
        if self.distill_weight.low < 0:
            raise ValueError("distill_weight must be >= 0")
        return self


class QuantizationSpace(Strict):
    """Per-layer (or per-group) precisions and integer settings; ``auto`` = what the profile
    allows.

    ``granularity``: one precision per ``layer``, per residual ``block``
    (``layer1.0``), per ``stage`` (``layer1``), one for the whole model
    (``uniform``), or ``ends``: the first two and last two compute layers one each
    and the body between them one. ``auto`` is ``layer`` for a model of at most 12
    compute layers and ``ends`` beyond. Grouping keeps the space small for large models.
    """

    granularity: Granularity = "layer"
    precisions: list[Precision] | Auto = "auto"
    quant_mode: list[QuantMode] | Auto | All = "auto"
    qat: list[bool] = [False, True]
    activation_type: list[ActivationType] | Auto | All = "auto"
    weight_type: list[WeightType] | Auto = "auto"
    per_channel: list[bool] | Auto = "auto"
    activation_symmetric: list[bool] | Auto | All = "auto"
    calibration_method: list[CalibrationMethod] = list(get_args(CalibrationMethod))
    calibration_samples: IntRange = IntRange(low=64, high=512)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:  # noqa: ANN401
        return _renamed(data, {"mode": "quant_mode", "activation_types": "activation_type",
                               "weight_types": "weight_type"})

    @model_validator(mode="after")
    def _non_empty(self) -> QuantizationSpace:
        for name in ("precisions", "quant_mode", "qat", "activation_type", "weight_type",
                     "per_channel", "activation_symmetric", "calibration_method"):
            if getattr(self, name) == []:
                raise ValueError(f"{name} must list at least one value (or be 'auto')")
        if self.calibration_samples.low < 1:
            raise ValueError("calibration_samples must be >= 1")
        return self


class SearchSpace(Strict):
    """A whole search space."""

    name: str = "custom"
    description: str = ""
    pruning: PruningSpace = PruningSpace()
    distillation: DistillationSpace = DistillationSpace()
    quantization: QuantizationSpace = QuantizationSpace()


def available_spaces() -> list[str]:
    """Names of the built-in spaces."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load a built-in space by name, or a user's space from a YAML path."""
    path = resolve_builtin(name_or_path, SPACES_DIR, "space", available_spaces())
    return load_model(SearchSpace, path)
