"""A search space resolved against a profile and a model: what each trial may pick, and why.

Resolving imports no Optuna; sampling the result is :mod:`search.study.sampling`, and the
trials a study starts from are :mod:`search.space.starts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from search._base.errors import ConfigError
from search._base.names import PRECISIONS, SEGMENTS
from search._base.records import Layer
from search.profiles import HardwareProfile
from search.space.schema import FloatRange, SearchSpace

__all__ = ["ModelFacts", "ResolvedSpace", "layer_group", "resolve_space"]

_RANK = list(PRECISIONS)  # least to most compressed


@dataclass(frozen=True)
class ModelFacts:
    """What the task's model offers the space beyond its layers."""

    droppable_blocks: int = 0  # residual blocks that can be replaced by the identity
    attention: bool = False  # has multi-head attention (heads can be removed)
    sparse_init: bool = False  # the task ships a pre-sparsified checkpoint
    batchnorm: bool = True  # has BatchNorm layers (whose scales bn_scale importance reads)
    feature_taps: bool = True  # has stages whose outputs feature distillation can compare
    # one output layer taking one vector per sample (or per token): relation distillation
    # compares the distances between those embeddings; a detector's several dense heads or
    # a segmenter's per-pixel 1x1 convolution have none
    embedding: bool = True


# ``auto`` granularity: every compute layer its own precision up to this many layers, and
# beyond, the ends one each and the body one. On CPUs an fp32 layer amid int8 ones costs
# its boundaries (quantize / dequantize passes, unfused neighbours): a 53-layer MobileNetV2
# (32 px, 1 thread, Zen 5) ran 0.21 ms in int8, 0.35 in fp32 and 0.57 with its 17 depthwise
# layers fp32 and the rest int8, and in a budget-20 study with a precision per layer, every
# plan the sampler drew (each layer int8 or fp32 at random) measured 0.23-0.43 ms: none as
# fast as uniform int8, whatever its pruning.
AUTO_LAYERS = 12
_ENDS = 2  # layers at each end with a precision of their own under ``ends``
BODY = "body"  # the group of the layers between the ends


def precision_groups(layers: list[Layer], granularity: str) -> tuple[str, dict[str, list[str]]]:
    """(The granularity in effect, each precision group's layers), in the layers' order."""
    if granularity == "auto":
        granularity = "layer" if len(layers) <= AUTO_LAYERS else "ends"
    if granularity == "ends" and len(layers) <= 2 * _ENDS + 1:
        granularity = "layer"  # no body to share a precision
    if granularity == "ends":
        names = [layer.name for layer in layers]
        body = BODY if BODY not in names else f"{BODY}*"
        return granularity, {**{n: [n] for n in names[:_ENDS]}, body: names[_ENDS:-_ENDS],
                             **{n: [n] for n in names[-_ENDS:]}}
    groups: dict[str, list[str]] = {}
    by = "layer" if granularity in ("uniform", "ends") else granularity
    for layer in layers:
        groups.setdefault(layer_group(layer.name, by), []).append(layer.name)
    return granularity, groups


def layer_group(name: str, granularity: str) -> str:
    """The group a layer's precision is chosen with.

    ``stage``: the first part of the module name (``layer1``); ``block``: up to
    the first numbered part (``layer1.0`` in torchvision ResNets,
    ``features.3`` in MobileNetV2), else the stage; ``layer``: the name itself.
    """
    if granularity == "layer":
        return name
    parts = name.split(".")
    if granularity == "block":
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else name


@dataclass(frozen=True)
class ResolvedSpace:
    """A space checked against a profile and a model: what each trial may pick."""

    space: SearchSpace
    layers: tuple[Layer, ...]
    layer_precisions: dict[str, tuple[str, ...]]
    groups: dict[str, tuple[str, ...]]  # precision group -> its layers
    group_precisions: dict[str, tuple[str, ...]]
    activation_types: tuple[str, ...]
    weight_types: tuple[str, ...]
    per_channel: tuple[bool, ...]
    activation_symmetric: tuple[bool, ...]
    modes: tuple[str, ...]
    patterns: tuple[str, ...]
    inits: tuple[str, ...]
    importances: tuple[str, ...] = ()  # channel importances this model has a signal for
    distill_losses: tuple[str, ...] = ()  # distillation losses this model can take
    facts: ModelFacts = ModelFacts()
    unstructured_sparsity: FloatRange = FloatRange(low=0.0, high=0.0)
    # dimension -> why it is offered as it is on this profile and model (`search spaces`)
    reasons: tuple[tuple[str, str], ...] = ()
    granularity: str = "layer"  # the precision granularity in effect (``auto`` decided)

    def describe(self) -> list[tuple[str, str, str]]:
        """(dimension, what is offered, why) for every dimension, as `search spaces` shows."""
        p, d = self.space.pruning, self.space.distillation
        why = dict(self.reasons)
        precisions = sorted({x for v in self.group_precisions.values() for x in v}, key=_RANK.index)
        blocks = min(p.drop_blocks.high, self.facts.droppable_blocks)
        rows = [
            ("init", ", ".join(self.inits), "sparse too when the task has a sparse checkpoint"),
            ("sparsity_pattern", ", ".join(self.patterns), why.get("sparsity_pattern", "")),
            ("unstructured_sparsity", _text(self.unstructured_sparsity),
             why.get("unstructured_sparsity", "")),
            ("drop_blocks", f"0-{blocks}" if blocks else "0",
             f"{self.facts.droppable_blocks} droppable residual block(s) in this model"),
            ("structured_ratio", _text(p.structured_ratio) + (
                f" per depth segment ({', '.join(SEGMENTS)})"
                if p.structured_granularity == "segment" else ""),
             "channels removed for real, rounded to the profile's channel multiple"
             + (": thin where the compute is, spare what accuracy needs"
                if p.structured_granularity == "segment" else "")),
            ("head_ratio", _text(p.head_ratio) if self.facts.attention else "0",
             "the model has multi-head attention" if self.facts.attention
             else "the model has no multi-head attention"),
            ("structured_importance", ", ".join(self.importances),
             why.get("structured_importance", "")),
            ("epochs", f"{d.epochs.low}-{d.epochs.high}", "distillation fine-tune; 0 = one-shot"),
            ("distill_loss", ", ".join(self.distill_losses), why.get("distill_loss", "")),
            ("precision", f"{', '.join(precisions)} per {self._granularity_text()}",
             "what the profile runs for each layer's op type"),
            ("quant_mode", ", ".join(self.modes), why.get("quant_mode", "")),
            ("activation_type", ", ".join(self.activation_types), why.get("activation_type", "")),
            ("weight_type", ", ".join(self.weight_types), "what the profile runs"),
            ("activation_symmetric", ", ".join(str(v).lower() for v in self.activation_symmetric),
             why.get("activation_symmetric", "")),
        ]
        return rows

    def _granularity_text(self) -> str:
        if self.granularity != "ends":
            return self.granularity
        ends = [g for g, names in self.groups.items() if len(names) == 1]
        body = max(len(names) for names in self.groups.values())
        return f"layer at the ends ({', '.join(ends)}), one for the {body} layers between"

    def common_precisions(self) -> list[str]:
        first, *rest = self.group_precisions.values()
        return [p for p in first if all(p in r for r in rest)]


def _text(r: FloatRange) -> str:
    return f"{r.low:g}" if r.low == r.high else f"{r.low:g}-{r.high:g}"


def _allowed(asked: Any, allowed: tuple[Any, ...], key: str, space: SearchSpace,
             owner: str, why: str = "") -> tuple[Any, ...]:
    """``auto`` -> ``allowed``; an explicit list must stay inside it, else ConfigError naming
    the space, the key, what was asked and what is allowed."""
    if asked == "auto":
        return tuple(allowed)
    bad = [v for v in asked if v not in allowed]
    if bad:
        raise ConfigError(
            f"space {space.name!r}: {key} asks for {', '.join(map(str, bad))}, which {owner} "
            f"does not allow{why}; allowed: [{', '.join(map(str, allowed))}]"
        )
    return tuple(asked)


# a space's choice -> the profile's list of what it runs, where the names differ
_PROFILE_LISTS = {"activation_type": "activation_types", "weight_type": "weight_types"}


def _quantization(what: str, space: SearchSpace, profile: HardwareProfile) -> tuple[Any, ...]:
    """A space's ``quantization.<what>`` within what the profile's ``int8`` section runs."""
    listed = tuple(getattr(profile.int8, _PROFILE_LISTS.get(what, what)))
    return _allowed(getattr(space.quantization, what), listed,
                    f"quantization.{what}", space, f"profile {profile.name!r}")


def _activation_types(space: SearchSpace, profile: HardwareProfile) -> tuple[tuple[str, ...], str]:
    """auto: the activation types the profile's int8 kernels fuse; all: every one it runs."""
    return _fast("activation_type", space, profile, "the profile's int8 kernels do not fuse "
                 "it, so it runs slower", "every type the profile runs fuses")


def _activation_symmetric(space: SearchSpace,
                          profile: HardwareProfile) -> tuple[tuple[bool, ...], str]:
    """auto: the activation ranges (symmetric or not) the profile's int8 kernels run fast."""
    return _fast("activation_symmetric", space, profile, "the profile's int8 kernels run it "
                 "slower", "the profile's int8 kernels run each as fast")


def _fast(what: str, space: SearchSpace, profile: HardwareProfile, slow_why: str,
          all_fast_why: str) -> tuple[tuple[Any, ...], str]:
    """What a quantization setting offers: ``auto``, the values the profile lists as fast
    (``fast_<what>``); ``all``, every value it runs; a list, those values, checked."""
    listed_as = _PROFILE_LISTS.get(what, what)
    runs = tuple(getattr(profile.int8, listed_as))
    asked = getattr(space.quantization, what)
    if asked == "all":
        return runs, "every value the profile runs (space asks for all)"
    listed = getattr(profile.int8, f"fast_{listed_as}")
    fast = tuple(t for t in runs if t in (runs if listed is None else listed))
    if asked == "auto":
        slow = [str(t).lower() if isinstance(t, bool) else str(t) for t in runs if t not in fast]
        return fast or runs, (f"{', '.join(slow)} not sampled: {slow_why}" if slow
                              else all_fast_why)
    return _allowed(asked, runs, f"quantization.{what}", space,
                    f"profile {profile.name!r}"), "as the space lists"


def _patterns(space: SearchSpace, profile: HardwareProfile) -> tuple[tuple[str, ...], str]:
    """Unstructured, plus the N:M pattern the profile's runtime accelerates."""
    allowed = ("unstructured", "2:4") if profile.sparse_kernels == "2:4" else ("unstructured",)
    asked = space.pruning.sparsity_pattern
    if asked in ("auto", "all"):
        why = ("2:4 where the profile's runtime has 2:4 kernels" if len(allowed) > 1 else
               "no N:M pattern: the profile's runtime has no N:M sparse kernels")
        return allowed, why
    return _allowed(asked, allowed, "pruning.sparsity_pattern", space,
                    f"profile {profile.name!r}", " (no N:M sparse kernels)"), "as the space lists"


def _unstructured(space: SearchSpace, profile: HardwareProfile) -> tuple[FloatRange, str]:
    """auto: sampled only where the runtime has unstructured sparse kernels; elsewhere zeros
    cost accuracy and buy no speed."""
    asked = space.pruning.unstructured_sparsity
    if asked != "auto":
        return asked, "as the space lists"
    if profile.sparse_kernels == "unstructured":
        return (FloatRange(low=0.0, high=0.8, step=0.05),
                "the profile's runtime has unstructured sparse kernels")
    return FloatRange(low=0.0, high=0.0), (
        f"not sampled: profile {profile.name!r} has no unstructured sparse kernels, so zeros "
        "cost accuracy and buy no speed (space 'exhaustive' samples it)")


def _modes(space: SearchSpace, profile: HardwareProfile,
           layers: Sequence[Layer]) -> tuple[tuple[str, ...], str]:
    """Static, plus dynamic where the profile runs uint8 activations on a CPU (ONNX Runtime's
    dynamic int8 kernels are CPU kernels with uint8 activations). ``auto`` leaves dynamic
    out for models with convolutions: ConvInteger is slower than fp32 (4.0 ms against
    0.6 ms for the digits ResNet here) while MatMulInteger pays on Linear-only models."""
    dynamic_ok = "uint8" in profile.int8.activation_types and profile.device_class == "cpu"
    allowed = ("static", "dynamic") if dynamic_ok else ("static",)
    asked = space.quantization.quant_mode
    if asked == "all":
        return allowed, "every mode the profile runs (space asks for all)"
    if asked == "auto":
        if not dynamic_ok:
            return ("static",), "dynamic int8 runs as CPU kernels with uint8 activations only"
        if any(layer.op_type == "Conv" for layer in layers):
            return ("static",), ("dynamic not sampled: the model has convolutions, and dynamic "
                                 "int8 convolutions (ConvInteger) run slower than fp32")
        return allowed, "dynamic int8 (MatMulInteger) pays on a model without convolutions"
    return _allowed(asked, allowed, "quantization.quant_mode", space, f"profile {profile.name!r}",
                    " (dynamic int8 runs as CPU kernels with uint8 activations)"), \
        "as the space lists"


def _inits(space: SearchSpace, facts: ModelFacts) -> tuple[str, ...]:
    allowed = ("teacher", "sparse") if facts.sparse_init else ("teacher",)
    return _allowed(space.pruning.init, allowed, "pruning.init", space, "the task",
                    " (sparse transfer needs a pre-sparsified checkpoint: --sparse-init; the "
                    "task has no pre-sparsified checkpoint)")


def _importances(space: SearchSpace, facts: ModelFacts) -> tuple[tuple[str, ...], str]:
    """The channel importances with a signal in this model: ``bn_scale`` reads BatchNorm
    scales, and without BatchNorm it ranks nothing (a BN-free MLP kept every width)."""
    asked = tuple(space.pruning.structured_importance)
    if facts.batchnorm:
        return asked, "every importance the space lists"
    return _without(asked, "bn_scale", "pruning.structured_importance", space,
                    "the model has no BatchNorm, whose scales it ranks channels by")


def _distill_losses(space: SearchSpace, facts: ModelFacts) -> tuple[tuple[str, ...], str]:
    """The distillation losses this model can take: ``feature`` compares the outputs of its
    stages, so a model without a stage that outputs a feature map or a sequence has none."""
    asked = tuple(space.distillation.distill_loss)
    notes = []
    if not facts.feature_taps:
        asked, note = _without(asked, "feature", "distillation.distill_loss", space,
                               "no stage of the model outputs a feature map or a sequence to "
                               "compare")
        notes.append(note)
    if not facts.embedding:
        asked, note = _without(asked, "relation", "distillation.distill_loss", space,
                               "the model's output layers take no per-sample embedding (dense "
                               "heads) whose distances it compares")
        notes.append(note)
    notes = [n for n in notes if not n.startswith("every")]
    return asked, "; ".join(notes) or "every loss the space lists"


def _without(asked: tuple[str, ...], name: str, key: str, space: SearchSpace,
             why: str) -> tuple[tuple[str, ...], str]:
    """``asked`` less ``name`` (with the reason), refusing a space left with nothing."""
    kept = tuple(a for a in asked if a != name)
    if not kept:
        raise ConfigError(f"space {space.name!r}: {key} lists only {name!r}, which this model "
                          f"cannot take ({why}); add another")
    return kept, (f"{name} not offered: {why}" if name in asked else "every one the space lists")


def _shared(per_layer: dict[str, tuple[str, ...]], names: list[str]) -> list[str]:
    """The precisions every one of ``names`` may run."""
    return [p for p in per_layer[names[0]] if all(p in per_layer[n] for n in names)]


def resolve_space(space: SearchSpace, profile: HardwareProfile,
                  layers: list[Layer] | tuple[Layer, ...],
                  facts: ModelFacts = ModelFacts()) -> ResolvedSpace:
    """Check ``space`` against ``profile`` for this model, before any trial runs."""
    quant = space.quantization
    per_layer: dict[str, tuple[str, ...]] = {}
    for layer in layers:
        allowed = profile.allowed(layer.op_type)
        if quant.precisions == "auto":
            per_layer[layer.name] = tuple(allowed)
            continue
        if layer.op_type not in profile.precisions:  # an op the profile says nothing of (an
            # LSTM on a GPU profile): it runs fp32, whatever a space lists for the others
            per_layer[layer.name] = tuple(p for p in quant.precisions if p in allowed) or ("fp32",)
            continue
        bad = [p for p in quant.precisions if p not in allowed]
        if bad:
            raise ConfigError(
                f"space {space.name!r}: layer {layer.name!r} ({layer.op_type}) would be offered "
                f"{', '.join(bad)}, which profile {profile.name!r} does not allow for "
                f"{layer.op_type}; allowed: {', '.join(allowed)}"
            )
        per_layer[layer.name] = tuple(quant.precisions)
    granularity, groups = precision_groups(list(layers), quant.granularity)
    if quant.granularity == "auto" and granularity == "ends" and not all(
            _shared(per_layer, names) for names in groups.values()):
        granularity, groups = precision_groups(list(layers), "layer")  # a body of mixed ops
    group_precisions = {}
    for group, names in groups.items():
        common = _shared(per_layer, names)
        if not common:
            raise ConfigError(
                f"space {space.name!r}: the layers of {granularity} {group!r} share no "
                f"precision on profile {profile.name!r} "
                f"({', '.join(f'{n}: {per_layer[n]}' for n in names)}); use granularity 'layer'"
            )
        group_precisions[group] = tuple(common)
    activation_types, activation_why = _activation_types(space, profile)
    activation_symmetric, symmetric_why = _activation_symmetric(space, profile)
    modes, modes_why = _modes(space, profile, layers)
    patterns, patterns_why = _patterns(space, profile)
    unstructured, unstructured_why = _unstructured(space, profile)
    importances, importances_why = _importances(space, facts)
    losses, losses_why = _distill_losses(space, facts)
    resolved = ResolvedSpace(
        space=space,
        granularity=granularity,
        layers=tuple(layers),
        layer_precisions=per_layer,
        groups={g: tuple(names) for g, names in groups.items()},
        group_precisions=group_precisions,
        activation_types=activation_types,
        weight_types=_quantization("weight_type", space, profile),
        per_channel=_quantization("per_channel", space, profile),
        activation_symmetric=activation_symmetric,
        modes=modes,
        patterns=patterns,
        inits=_inits(space, facts),
        importances=importances,
        distill_losses=losses,
        facts=facts,
        unstructured_sparsity=unstructured,
        reasons=(("unstructured_sparsity", unstructured_why), ("sparsity_pattern", patterns_why),
                 ("quant_mode", modes_why), ("activation_type", activation_why),
                 ("activation_symmetric", symmetric_why),
                 ("structured_importance", importances_why), ("distill_loss", losses_why)),
    )
    if quant.granularity == "uniform" and not resolved.common_precisions():
        raise ConfigError(
            f"space {space.name!r}: granularity 'uniform' needs a precision every layer may "
            f"use, and profile {profile.name!r} has none in common: {per_layer}"
        )
    return resolved
