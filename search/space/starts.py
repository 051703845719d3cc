"""Where a study starts: the baselines and the known-good combinations it enqueues first.

The fp32 reference and uniform int8 are the front's anchors (every speedup is relative
to the reference; uniform int8 is what a one-line post-training quantizer gives); the
seeds are channel-pruned students at the fastest precision every layer may run, so the
sampler starts from a strong front. Each is a dict of Optuna parameters as
:mod:`search.study.sampling` names them, within what the resolved space offers.
"""

from __future__ import annotations

from typing import Any

from search._base.names import PRECISIONS, SEGMENTS
from search.space.resolve import ResolvedSpace
from search.space.schema import FloatRange, IntRange

__all__ = ["baselines", "seeds"]

_RANK = list(PRECISIONS)  # least to most compressed

# A start's fine-tune is a screen, not its last word: the refinement after the budget gives
# the front's members 12 epochs. With 3 epochs here, the starts of budget-50 studies of the
# default task ended dominated by refined faster trials, 6-8 % of the trial time each
_START_EPOCHS = 1

_UNCOMPRESSED: dict[str, Any] = {
    "init": "teacher", "sparsity_pattern": "unstructured", "unstructured_sparsity": 0.0,
    "drop_blocks": 0, "head_ratio": 0.0, "epochs": 0,
}


def baselines(resolved: ResolvedSpace) -> list[tuple[str, dict[str, Any]]]:
    """The trials enqueued first, as (label, params).

    First the reference: every layer at the highest precision the profile
    allows it (fp32 where allowed; fp16 on a VPU, int16 on a GNA), nothing
    pruned, no fine-tune. Then uniform static U8S8 int8 (per-channel, min-max
    calibration) when a layer may run int8 and that differs: every layer that may, the
    rest at the reference's precision, as a post-training quantizer leaves what it cannot
    quantize (an LSTM on a GPU profile) in float.
    """
    top = _reference_plan(resolved)
    label = next(iter(set(top.values()))) if len(set(top.values())) == 1 else "reference"
    out = [(label, {**_UNCOMPRESSED, **_channels(resolved, 0.0), **_plan(resolved, top)})]
    if _any_int8(resolved) and label != "int8":
        out.append(("int8", {**_UNCOMPRESSED, **_channels(resolved, 0.0),
                             **_int8_params(resolved)}))
    return out


def seeds(resolved: ResolvedSpace, *, reference_precisions: bool = False,
          first_kept: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Known-good combinations enqueued after the baselines, so the sampler starts from a
    strong front: channels pruned (and a block dropped) at the most compressed precision
    every layer may run, or with ``reference_precisions`` at the reference's (where uniform
    int8 measured slower than the reference: a GRU's int8 runs unrolled, about 3x slower
    than its fp32 kernel at hidden 128), recovered by distillation. Only values the space
    offers are used.

    With ``first_kept`` (uniform int8 lost more than the allowed drop) the first precision
    group stays at the reference's precision, and that int8 plan is itself the first
    start: the input layer, with its few channels reading raw pixels and the widest
    weights, is where int8 often loses most, and keeping it costs little speed (on the
    bundled FCOS detector, fp32 there gave 2.3x fp32 against uniform int8's 2.6x).
    """
    pruning, distil = resolved.space.pruning, resolved.space.distillation
    out: list[tuple[str, dict[str, Any]]] = []
    kept = (first_kept and not reference_precisions and "teacher" in resolved.inits
            and _first_keepable(resolved))
    if kept:
        out.append((f"int8-first-{kept}", {**_UNCOMPRESSED, **_channels(resolved, 0.0),
                                            **_keep_first(resolved, _int8_params(resolved))}))
    if distil.epochs.high < 1 or pruning.structured_ratio.high <= 0:
        return out
    if reference_precisions:
        plan = _plan(resolved, _reference_plan(resolved))
    else:
        plan = (_int8_params(resolved) if _all_int8(resolved) else
                _plan(resolved, {g: max(p, key=_RANK.index)
                                 for g, p in resolved.group_precisions.items()}))
        if kept:
            plan = _keep_first(resolved, plan)
    tune = {"epochs": min(_START_EPOCHS, distil.epochs.high), "lr": _clip(3e-3, distil.lr),
            "temperature": _clip(4.0, distil.temperature), "alpha": _clip(0.5, distil.alpha),
            "distill_loss": "response" if "response" in resolved.distill_losses
            else resolved.distill_losses[0]}
    if "qat" in plan:
        plan = {**plan, "qat": False}
    for label, ratio, drop in (("pruned-0.5", 0.5, 0), ("pruned-0.3-dropped-1", 0.3, 1),
                               ("pruned-0.65", 0.65, 0)):
        if drop > min(pruning.drop_blocks.high, resolved.facts.droppable_blocks):
            continue
        params = {**_UNCOMPRESSED, **plan, **tune, "drop_blocks": drop,
                  **_channels(resolved, _clip(ratio, pruning.structured_ratio)),
                  "structured_importance": resolved.importances[0]}
        if all(params != p for _, p in out):  # a narrow range clips two seeds alike
            out.append((label, params))
    return out


def _first_keepable(resolved: ResolvedSpace) -> str | None:
    """The reference's precision of the first group, where a plan may keep it while the
    rest runs int8 (not with one precision for the whole model)."""
    if resolved.granularity == "uniform" or len(resolved.group_precisions) < 2:
        return None
    first = next(iter(resolved.group_precisions))
    top = _reference_plan(resolved)[first]
    return top if top != "int8" else None


def _keep_first(resolved: ResolvedSpace, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the first precision group at the reference's precision."""
    first = next(iter(resolved.group_precisions))
    return {**params, f"precision.{first}": _reference_plan(resolved)[first]}


def _channels(resolved: ResolvedSpace, ratio: float) -> dict[str, float]:
    """The channel-pruning parameters for ``ratio`` everywhere, as the sampler names them."""
    if resolved.space.pruning.structured_granularity == "segment":
        return {f"structured_ratio.{s}": ratio for s in SEGMENTS}
    return {"structured_ratio": ratio}


def _reference_plan(resolved: ResolvedSpace) -> dict[str, str]:
    """Each group at the highest precision it may run (fp32 where allowed)."""
    return {g: min(allowed, key=_RANK.index) for g, allowed in resolved.group_precisions.items()}


def _all_int8(resolved: ResolvedSpace) -> bool:
    return all("int8" in p for p in resolved.group_precisions.values())


def _any_int8(resolved: ResolvedSpace) -> bool:
    return any("int8" in p for p in resolved.group_precisions.values())


def _int8_params(resolved: ResolvedSpace) -> dict[str, Any]:
    """int8 for every group that may run it, the reference's precision for the rest."""
    q = resolved.space.quantization
    top = _reference_plan(resolved)
    int8: dict[str, Any] = _plan(resolved, {g: "int8" if "int8" in allowed else top[g]
                                       for g, allowed in resolved.group_precisions.items()})
    int8["quant_mode"] = "static"
    int8["qat"] = False
    int8["activation_type"] = (
        "uint8" if "uint8" in resolved.activation_types else resolved.activation_types[0]
    )
    int8["weight_type"] = "int8" if "int8" in resolved.weight_types else resolved.weight_types[0]
    int8["per_channel"] = True if True in resolved.per_channel else resolved.per_channel[0]
    int8["activation_symmetric"] = (
        False if False in resolved.activation_symmetric else resolved.activation_symmetric[0]
    )
    int8["calibration_method"] = ("minmax" if "minmax" in q.calibration_method
                                  else q.calibration_method[0])
    r = q.calibration_samples
    int8["calibration_samples"] = min(max(256, r.low), r.high)
    return int8


def _plan(resolved: ResolvedSpace, plan: dict[str, str]) -> dict[str, str]:
    if resolved.granularity == "uniform":
        return {"precision": next(iter(plan.values()))}
    return {f"precision.{group}": p for group, p in plan.items()}


def _clip(value: float, r: FloatRange | IntRange) -> float:
    """``value`` inside ``r`` (on its step grid when it has one)."""
    value = min(max(value, r.low), r.high)
    step = getattr(r, "step", None)
    if step:
        value = r.low + round((value - r.low) / step) * step
    return round(value, 9)
