"""Sampling: the Optuna sampler of a study, and a resolved space drawn from (the only
module that calls ``trial.suggest_*``).

Define-by-run with conditional dimensions: a dimension is only suggested when
the choices before it make it matter (the temperature only with a fine-tune,
int8 settings only when some layer runs int8), so the sampler never learns
from values that had no effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from search._base.attrs import TrialKey
from search._base.errors import ConfigError
from search._base.names import INTEGER_PRECISIONS, SEGMENTS
from search._base.records import Choices
from search.config import SAMPLERS
from search.space.resolve import ResolvedSpace
from search.space.schema import FloatRange, IntRange

__all__ = ["make_sampler", "sample"]


def sample(resolved: ResolvedSpace, trial: optuna.Trial,
           pinned: dict[str, Any] | None = None) -> Choices:
    """Draw one trial's choices (define-by-run, with conditional dimensions).

    ``pinned`` values are taken as they are, even where the space fixes a
    dimension: a baseline is the uncompressed model whatever the space says.
    """
    draw = _Draw(trial, pinned or {})
    c = Choices()
    _sparsity(draw, resolved, c)
    _structure(draw, resolved, c)
    _distillation(draw, resolved, c)
    _precisions(draw, resolved, c)
    return c


def _sparsity(draw: _Draw, resolved: ResolvedSpace, c: Choices) -> None:
    pruning = resolved.space.pruning
    c.init = _categorical(draw, "init", resolved.inits)
    if c.init != "teacher":
        return
    c.sparsity_pattern = _categorical(draw, "sparsity_pattern", resolved.patterns)
    if c.sparsity_pattern == "unstructured":
        c.unstructured_sparsity = _float(draw, "unstructured_sparsity",
                                         resolved.unstructured_sparsity)
        if c.unstructured_sparsity > 0:
            c.unstructured_scope = _categorical(draw, "unstructured_scope",
                                                pruning.unstructured_scope)
    if c.sparsity_pattern != "unstructured" or c.unstructured_sparsity > 0:
        c.unstructured_criterion = _categorical(draw, "unstructured_criterion",
                                                pruning.unstructured_criterion)


def _structure(draw: _Draw, resolved: ResolvedSpace, c: Choices) -> None:
    pruning = resolved.space.pruning
    blocks = IntRange(low=min(pruning.drop_blocks.low, resolved.facts.droppable_blocks),
                      high=min(pruning.drop_blocks.high, resolved.facts.droppable_blocks))
    c.drop_blocks = _int(draw, "drop_blocks", blocks)
    if pruning.structured_granularity == "segment":
        c.segment_ratios = {s: _float(draw, f"structured_ratio.{s}", pruning.structured_ratio)
                            for s in SEGMENTS}
        c.structured_ratio = max(c.segment_ratios.values())
    else:
        c.structured_ratio = _float(draw, "structured_ratio", pruning.structured_ratio)
    if c.structured_ratio > 0:
        c.structured_importance = _categorical(draw, "structured_importance",
                                               resolved.importances)
    if resolved.facts.attention:
        c.head_ratio = _float(draw, "head_ratio", pruning.head_ratio)


def _distillation(draw: _Draw, resolved: ResolvedSpace, c: Choices) -> None:
    distil = resolved.space.distillation
    c.epochs = _int(draw, "epochs", distil.epochs)
    if c.epochs > 0:
        c.lr = _float(draw, "lr", distil.lr)
        c.temperature = _float(draw, "temperature", distil.temperature)
        c.alpha = _float(draw, "alpha", distil.alpha)
        c.distill_loss = _categorical(draw, "distill_loss", resolved.distill_losses)
        if c.distill_loss != "response":
            c.distill_weight = _float(draw, "distill_weight", distil.distill_weight)


def _precisions(draw: _Draw, resolved: ResolvedSpace, c: Choices) -> None:
    """Per-group precisions, then the int8 knobs only where a layer is integer."""
    quant = resolved.space.quantization
    if resolved.granularity == "uniform":
        pick = _categorical(draw, "precision", resolved.common_precisions())
        c.precisions = {layer.name: pick for layer in resolved.layers}
    else:
        chosen = {g: _categorical(draw, f"precision.{g}", resolved.group_precisions[g])
                  for g in resolved.groups}
        c.precisions = {name: chosen[g] for g, names in resolved.groups.items() for name in names}
    if not any(p in INTEGER_PRECISIONS for p in c.precisions.values()):
        return
    wide = "int16" in c.precisions.values()
    c.quant_mode = "static" if wide else _categorical(draw, "quant_mode", resolved.modes)
    c.weight_type = _categorical(draw, "weight_type", resolved.weight_types)
    c.per_channel = _categorical(draw, "per_channel", resolved.per_channel)
    if c.quant_mode == "static":
        c.activation_type = _categorical(draw, "activation_type", resolved.activation_types)
        c.activation_symmetric = _categorical(draw, "activation_symmetric",
                                              resolved.activation_symmetric)
        c.calibration_method = _categorical(draw, "calibration_method",
                                            quant.calibration_method)
        c.calibration_samples = _int(draw, "calibration_samples", quant.calibration_samples)
        if c.epochs > 0 and not wide:
            c.qat = _categorical(draw, "qat", quant.qat)


@dataclass(frozen=True)
class _Draw:
    """A trial to suggest from, and the values pinned for it (baselines, seeds)."""

    trial: optuna.Trial
    pinned: dict[str, Any]


def _float(draw: _Draw, name: str, r: FloatRange) -> float:
    if r.low == r.high and name not in draw.pinned:
        return r.low
    if name in draw.pinned and not r.low <= draw.pinned[name] <= r.high:
        return float(draw.pinned[name])  # outside the space: taken, not shown to the sampler
    # an enqueued trial's suggest returns its pinned value, and the sampler learns from it
    return draw.trial.suggest_float(name, r.low, r.high, log=r.log, step=r.step) \
        if r.low < r.high else float(draw.pinned[name])


def _int(draw: _Draw, name: str, r: IntRange) -> int:
    if r.low == r.high and name not in draw.pinned:
        return r.low
    if name in draw.pinned and not r.low <= draw.pinned[name] <= r.high:
        return int(draw.pinned[name])
    return draw.trial.suggest_int(name, r.low, r.high) if r.low < r.high \
        else int(draw.pinned[name])


def _categorical(draw: _Draw, name: str, options: tuple[Any, ...] | list[Any]) -> Any:
    if name in draw.pinned and (draw.pinned[name] not in options or len(options) == 1):
        return draw.pinned[name]
    if len(options) == 1:
        return options[0]
    return draw.trial.suggest_categorical(name, list(options))


def _constraint_values(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's constraint convention: <= 0 is feasible. Computed by the driver at tell time."""
    return list(trial.user_attrs.get(TrialKey.CONSTRAINT_VALUES, [0.0]))


def make_sampler(name: str, seed: int, budget: int,
                 constrained: bool = False) -> optuna.samplers.BaseSampler:
    """Seeded sampler; re-created identically when a study resumes (Optuna does not persist it).

    With ``constrained``, the sampler learns from the trials' constraint values
    (accuracy drop, latency target) and prefers feasible regions.
    """
    constraints = _constraint_values if constrained else None
    startup = max(4, min(10, budget // 3))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=startup, constraints_func=constraints)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, budget // 3)),
                                             constraints_func=constraints)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup,
                                         constraints_func=constraints,
                                         warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
