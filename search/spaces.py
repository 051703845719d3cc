"""Search spaces: data (``spaces/*.yaml``) validated against a profile, then sampled.

This is the only module that calls ``trial.suggest_*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import Field, model_validator

from search._schema import Strict, load_model, resolve_builtin
from search.errors import ConfigError
from search.profiles import HardwareProfile, Precision
from search.record import Choices, Layer

__all__ = [
    "SPACES_DIR",
    "FloatRange",
    "IntRange",
    "ResolvedSpace",
    "SearchSpace",
    "available_spaces",
    "load_space",
    "resolve_space",
]

SPACES_DIR = Path(__file__).resolve().parent.parent / "spaces"
Auto = Literal["auto"]
_RANK = ["fp32", "bf16", "fp16", "int16", "int8", "int4"]  # least to most compressed


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


def _unit(low: float, high: float, step: float | None = 0.05) -> FloatRange:
    return FloatRange(low=low, high=high, step=step)


class PruningSpace(Strict):
    """Global unstructured magnitude sparsity and structured channel-pruning ratio."""

    unstructured_sparsity: FloatRange = _unit(0.0, 0.8)
    structured_ratio: FloatRange = _unit(0.0, 0.6)

    @model_validator(mode="after")
    def _fractions(self) -> PruningSpace:
        for name in ("unstructured_sparsity", "structured_ratio"):
            r = getattr(self, name)
            if r.low < 0 or r.high >= 1:
                raise ValueError(f"{name} must lie in [0, 1), got [{r.low}, {r.high}]")
        return self


class DistillationSpace(Strict):
    """Fine-tuning with response distillation; 0 epochs means one-shot post-training."""

    epochs: IntRange = IntRange(low=0, high=3)
    lr: FloatRange = FloatRange(low=1e-4, high=1e-2, log=True)
    temperature: FloatRange = FloatRange(low=1.0, high=8.0)
    alpha: FloatRange = _unit(0.0, 1.0)

    @model_validator(mode="after")
    def _sane(self) -> DistillationSpace:
        if self.epochs.low < 0:
            raise ValueError("epochs must be >= 0")
        if self.temperature.low <= 0:
            raise ValueError("temperature must be > 0")
        if self.alpha.low < 0 or self.alpha.high > 1:
            raise ValueError("alpha must lie in [0, 1]")
        return self


class QuantizationSpace(Strict):
    """Per-layer precisions and int8 settings; ``auto`` means what the profile allows."""

    granularity: Literal["layer", "uniform"] = "layer"
    precisions: list[Precision] | Auto = "auto"
    activation_types: list[Literal["uint8", "int8", "int16"]] | Auto = "auto"
    weight_types: list[Literal["int8", "uint8"]] | Auto = "auto"
    per_channel: list[bool] | Auto = "auto"
    activation_symmetric: list[bool] | Auto = "auto"
    calibration_samples: IntRange = IntRange(low=128, high=128)

    @model_validator(mode="after")
    def _non_empty(self) -> QuantizationSpace:
        for name in ("precisions", "activation_types", "weight_types", "per_channel",
                     "activation_symmetric"):
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


@dataclass(frozen=True)
class ResolvedSpace:
    """A space checked against a profile and a model's layers: what each trial may pick."""

    space: SearchSpace
    layers: tuple[Layer, ...]
    layer_precisions: dict[str, tuple[str, ...]]
    activation_types: tuple[str, ...]
    weight_types: tuple[str, ...]
    per_channel: tuple[bool, ...]
    activation_symmetric: tuple[bool, ...]

    def baselines(self) -> list[tuple[str, dict[str, Any]]]:
        """The trials enqueued first, as (label, params).

        First the reference: every layer at the highest precision the profile
        allows it (fp32 where allowed; fp16 on a VPU, int16 on a GNA). Then
        uniform int8 when every layer may run int8 and that differs.
        """
        base: dict[str, Any] = {
            "unstructured_sparsity": 0.0,
            "structured_ratio": 0.0,
            "epochs": 0,
        }
        top = {name: min(allowed, key=_RANK.index) for name, allowed in self.layer_precisions.items()}
        label = next(iter(set(top.values()))) if len(set(top.values())) == 1 else "reference"
        out = [(label, {**base, **self._plan(top)})]
        if all("int8" in p for p in self.layer_precisions.values()) and label != "int8":
            int8 = {**base, **self._plan({name: "int8" for name in self.layer_precisions})}
            int8["activation_type"] = (
                "uint8" if "uint8" in self.activation_types else self.activation_types[0]
            )
            int8["weight_type"] = "int8" if "int8" in self.weight_types else self.weight_types[0]
            int8["per_channel"] = True if True in self.per_channel else self.per_channel[0]
            int8["activation_symmetric"] = (
                False if False in self.activation_symmetric else self.activation_symmetric[0]
            )
            out.append(("int8", int8))
        return out

    def _plan(self, plan: dict[str, str]) -> dict[str, str]:
        if self.space.quantization.granularity == "uniform":
            return {"precision": next(iter(plan.values()))}
        return {f"precision.{name}": p for name, p in plan.items()}

    def sample(self, trial: optuna.Trial) -> Choices:
        """Draw one trial's choices (define-by-run, with conditional dimensions)."""
        pruning, distil, quant = self.space.pruning, self.space.distillation, self.space.quantization
        choices = Choices(
            unstructured_sparsity=_float(trial, "unstructured_sparsity", pruning.unstructured_sparsity),
            structured_ratio=_float(trial, "structured_ratio", pruning.structured_ratio),
            epochs=_int(trial, "epochs", distil.epochs),
        )
        if choices.epochs > 0:
            choices.lr = _float(trial, "lr", distil.lr)
            choices.temperature = _float(trial, "temperature", distil.temperature)
            choices.alpha = _float(trial, "alpha", distil.alpha)
        if quant.granularity == "uniform":
            common = [p for p in self._common_precisions()]
            pick = _categorical(trial, "precision", common)
            choices.precisions = {layer.name: pick for layer in self.layers}
        else:
            choices.precisions = {
                layer.name: _categorical(
                    trial, f"precision.{layer.name}", self.layer_precisions[layer.name]
                )
                for layer in self.layers
            }
        if any(p in ("int8", "int16") for p in choices.precisions.values()):
            choices.activation_type = _categorical(trial, "activation_type", self.activation_types)
            choices.weight_type = _categorical(trial, "weight_type", self.weight_types)
            choices.per_channel = _categorical(trial, "per_channel", self.per_channel)
            choices.activation_symmetric = _categorical(
                trial, "activation_symmetric", self.activation_symmetric
            )
            choices.calibration_samples = _int(
                trial, "calibration_samples", quant.calibration_samples
            )
        return choices

    def _common_precisions(self) -> list[str]:
        first, *rest = self.layer_precisions.values()
        return [p for p in first if all(p in r for r in rest)]


def _float(trial: optuna.Trial, name: str, r: FloatRange) -> float:
    if r.low == r.high:
        return r.low
    return trial.suggest_float(name, r.low, r.high, log=r.log, step=r.step)


def _int(trial: optuna.Trial, name: str, r: IntRange) -> int:
    if r.low == r.high:
        return r.low
    return trial.suggest_int(name, r.low, r.high)


def _categorical(trial: optuna.Trial, name: str, options: tuple[Any, ...] | list[Any]) -> Any:
    if len(options) == 1:
        return options[0]
    return trial.suggest_categorical(name, list(options))


def _pick(space_value: Any, profile_value: list[Any], what: str, space: SearchSpace,
          profile: HardwareProfile) -> tuple[Any, ...]:
    if space_value == "auto":
        return tuple(profile_value)
    bad = [v for v in space_value if v not in profile_value]
    if bad:
        raise ConfigError(
            f"space {space.name!r}: quantization.{what} asks for {bad}, which profile "
            f"{profile.name!r} does not allow; allowed: {profile_value}"
        )
    return tuple(space_value)


def resolve_space(space: SearchSpace, profile: HardwareProfile,
                  layers: list[Layer] | tuple[Layer, ...]) -> ResolvedSpace:
    """Check ``space`` against ``profile`` for these layers, before any trial runs."""
    quant = space.quantization
    per_layer: dict[str, tuple[str, ...]] = {}
    for layer in layers:
        allowed = profile.allowed(layer.op_type)
        if quant.precisions == "auto":
            per_layer[layer.name] = tuple(allowed)
            continue
        bad = [p for p in quant.precisions if p not in allowed]
        if bad:
            raise ConfigError(
                f"space {space.name!r}: layer {layer.name!r} ({layer.op_type}) would be offered "
                f"{', '.join(bad)}, which profile {profile.name!r} does not allow for "
                f"{layer.op_type}; allowed: {', '.join(allowed)}"
            )
        per_layer[layer.name] = tuple(quant.precisions)
    resolved = ResolvedSpace(
        space=space,
        layers=tuple(layers),
        layer_precisions=per_layer,
        activation_types=_pick(quant.activation_types, profile.int8.activation_types,
                               "activation_types", space, profile),
        weight_types=_pick(quant.weight_types, profile.int8.weight_types, "weight_types",
                           space, profile),
        per_channel=_pick(quant.per_channel, profile.int8.per_channel, "per_channel", space,
                          profile),
        activation_symmetric=_pick(quant.activation_symmetric,
                                   profile.int8.activation_symmetric, "activation_symmetric",
                                   space, profile),
    )
    if quant.granularity == "uniform" and not resolved._common_precisions():
        raise ConfigError(
            f"space {space.name!r}: granularity 'uniform' needs a precision every layer may "
            f"use, and profile {profile.name!r} has none in common: {per_layer}"
        )
    return resolved
