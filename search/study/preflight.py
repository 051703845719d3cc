"""Preflight: try each technique once on the task's model before trial 0.

A technique that breaks on a model's idioms would fail every trial that draws
it; trying it once at its extreme setting (prune, a forward pass, ONNX export,
the precision plan, one ONNX Runtime run; no training) and removing it from
the space costs seconds and says why, instead of a study of failed trials.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from pathlib import Path

import onnx
import torch
from torch import nn

from search._base.names import SEGMENTS
from search._base.ort import make_session
from search._base.paths import cache_dir, write_atomic
from search._base.records import Choices, TrialRecord
from search.profiles import HardwareProfile
from search.space.resolve import ResolvedSpace
from search.space.schema import FloatRange, IntRange
from search.tasks import Task
from search.trial.compress import apply_precision_plan, compressible_layers, export_onnx, onnx_node_names
from search.trial.compress._layers import WEIGHTED
from search.trial.compress.applicable import applicable
from search.trial.pipeline import prune_student

__all__ = ["preflight"]

log = logging.getLogger("search")
_SAMPLES = 32  # calibration and check inputs: enough to exercise, cheap to run


def preflight(task: Task, profile: HardwareProfile, resolved: ResolvedSpace,
              outcomes: dict[str, str] | None = None) -> tuple[ResolvedSpace, list[str], list[str]]:
    """``resolved`` without the techniques that fail on ``task``'s model, why each went, and
    notes on what the model has no structure for (the space already leaves those out).

    Techniques the model has no structure for (no droppable block, no
    attention) are named with the reason. Each technique the space offers runs
    alone at the top of its range; what raises is removed (a range fixed at 0,
    a quantization mode dropped, int8 taken out of every layer's precisions
    when no mode works).

    ``outcomes`` (technique -> error, "" when it ran) holds what was tried
    before, by the study being resumed: that is not tried again, so a resumed
    study keeps the space it started with; what is tried now is added to it.
    """
    notes = _structural(task, resolved)
    removed = []
    outcomes = {} if outcomes is None else outcomes
    model = _model_key(task)
    for name, choices in _extremes(resolved).items():
        if name not in outcomes:
            outcomes[name] = _try_once(model, task, profile, choices)
        error = outcomes[name]
        if error:
            removed.append(f"{name} is not offered for this model: {error}")
            resolved = _without(resolved, name)
    return resolved, removed, notes


def _structural(task: Task, resolved: ResolvedSpace) -> list[str]:
    """Why the space asks for layer dropping or head pruning and the model has nothing for
    it (the resolved space already leaves them out; this says so)."""
    p, out = resolved.space.pruning, []
    asked = {"drop_blocks": ("layer dropping", p.drop_blocks.high > 0),
             "heads": ("head pruning", p.head_ratio.high > 0)}
    model, example = task.teacher(), task.example()
    for technique, (name, wanted) in asked.items():
        ok, why = applicable(model, technique, example) if wanted else (True, "")
        if not ok:
            out.append(f"{name} is not offered for this model: {why}")
    quantized = {name for name, options in resolved.layer_precisions.items()
                 if set(options) - {"fp32"}}
    return out + _uncovered(model, quantized)


# whose weights the search reaches by other means (attention is split into Linear layers for
# head pruning and precision), that do too little work to matter (norms), or whose weights are
# looked up rather than multiplied (embeddings)
_NOT_NOTED = (nn.MultiheadAttention, nn.modules.batchnorm._NormBase, nn.LayerNorm,
              nn.GroupNorm, nn.Embedding, nn.EmbeddingBag)
_UNCOVERED_SHARE = 0.1  # a module type holding less of the model is not worth a line


def _uncovered(model: nn.Module, quantized: set[str]) -> list[str]:
    """Module types that hold a large share of the weights and that no technique here
    compresses (an LSTM or GRU on a profile without int8 kernels for it, an ``nn.RNN``: no
    precision is chosen for it, and it runs in fp32 in every trial; recurrent layers still
    lose hidden units to structured pruning), so a user knows why the front's speedups are
    small. ``quantized``: layers offered a precision besides fp32."""
    total = sum(p.numel() for p in model.parameters())
    covered = {id(p) for name, m in model.named_modules()
               if isinstance(m, (*WEIGHTED, *_NOT_NOTED)) or name in quantized
               for p in m.parameters()}
    held: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    recurrent = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in covered]
        if own:
            kind = type(module).__name__
            held.setdefault(kind, []).append(name)
            counts[kind] = counts.get(kind, 0) + sum(p.numel() for p in own)
            if isinstance(module, nn.RNNBase):
                recurrent.add(kind)
    width = {True: "here (their hidden width is pruned)", False: "and no width of their own here"}
    return [f"{kind} layers ({', '.join(held[kind][:3])}{', ...' if len(held[kind]) > 3 else ''}"
            f"; {n / total:.0%} of the parameters) get no precision {width[kind in recurrent]}"
            ": they run in fp32 in every trial, so they bound the speedup"
            for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])
            if total and n / total >= _UNCOVERED_SHARE]


def _extremes(resolved: ResolvedSpace) -> dict[str, Choices]:
    """Each technique the space offers at its most aggressive setting."""
    p = resolved.space.pruning
    out: dict[str, Choices] = {}
    if p.structured_ratio.high > 0:
        high = p.structured_ratio.high
        segments = ({s: high for s in SEGMENTS} if p.structured_granularity == "segment" else {})
        out["structured pruning"] = Choices(structured_ratio=high, segment_ratios=segments)
    blocks = min(p.drop_blocks.high, resolved.facts.droppable_blocks)
    if blocks > 0:
        out["layer dropping"] = Choices(drop_blocks=blocks)
    if resolved.facts.attention and p.head_ratio.high > 0:
        out["head pruning"] = Choices(head_ratio=p.head_ratio.high)
    if resolved.unstructured_sparsity.high > 0:
        out["weight sparsity"] = Choices(unstructured_sparsity=resolved.unstructured_sparsity.high)
    int8 = {layer.name: "int8" for layer in resolved.layers
            if "int8" in resolved.layer_precisions[layer.name]}
    for mode in resolved.modes if int8 else ():
        out[f"{mode} int8"] = Choices(precisions=int8, quant_mode=mode,
                                      calibration_samples=_SAMPLES)
    return out


# what was tried in this process: a notebook (or a test session) running several studies of
# one model tries each technique once, not once per study (seconds each); what passed is
# also noted in the cache directory, for the next process
_TRIED: dict[tuple[str, str, str], str] = {}


def _model_key(task: Task) -> str:
    """What a preflight outcome depends on besides the setting tried: the model (its
    architecture and weights) and the inputs it is checked and calibrated on."""
    digest = hashlib.sha1(f"{task.name}|{task.input_shape}|{task.make_model!r}".encode())
    named = [*sorted(task.teacher_state.items()), ("check", task.val.x[:_SAMPLES]),
             ("calibration", task.calibration[:_SAMPLES])]
    for name, value in named:
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):  # raw bytes, whatever the dtype (bf16 included)
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                          .numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _try_once(model: str, task: Task, profile: HardwareProfile, choices: Choices) -> str:
    key = (model, repr(choices), profile.model_dump_json())  # channel multiple, int8 kernels
    if key not in _TRIED:
        marker = _passed_marker(key)
        if marker.exists():
            _TRIED[key] = ""
        else:
            _TRIED[key] = _try(task, profile, choices)
            if not _TRIED[key]:
                _remember_passed(marker)
    return _TRIED[key]


@functools.cache
def _code_digest() -> str:
    """This package's source and the versions of the libraries a preflight runs: a technique
    that passed under other code is tried again."""
    import onnxruntime
    import torch_pruning

    digest = hashlib.sha1(f"{torch.__version__}|{onnx.__version__}|{onnxruntime.__version__}|"
                          f"{torch_pruning.__version__}".encode())
    package = Path(__file__).resolve().parents[1]  # the whole search package
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _passed_marker(key: tuple[str, str, str]) -> Path:
    """Where a technique that passed on this model, profile and code is noted between
    processes (every new study of a command line would otherwise pay seconds to try it)."""
    digest = hashlib.sha1("|".join((*key, _code_digest())).encode()).hexdigest()
    return cache_dir() / "preflight" / digest


def _remember_passed(marker: Path) -> None:
    """Only passes are kept: a failure may be the machine's (memory), so it is tried again."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, lambda handle: handle.write(b"passed\n"))
    except OSError:  # a read-only cache costs the next study seconds, nothing else
        pass


def _try(task: Task, profile: HardwareProfile, choices: Choices) -> str:
    """The stages of a trial without its fine-tune; "" when they run, else the error."""
    try:
        student = prune_student(TrialRecord(0, choices), task, profile)
        x = task.val.x[:_SAMPLES]
        with torch.no_grad():
            student(x)
        layers = compressible_layers(student, task.example())
        plan = {layer.name: choices.precisions.get(layer.name, "fp32") for layer in layers}
        fp32 = export_onnx(student, task.input_shape, task.input_dtype, precisions=plan)
        names = onnx_node_names(onnx.load_from_string(fp32), layers)
        model = apply_precision_plan(fp32, plan, names, choices, task.calibration[:_SAMPLES],
                                     reduce_range=profile.int8.reduce_range)
        make_session(model, threads=1).run(None, {"input": x.numpy()})
    except Exception as exc:  # any failure removes the technique; the reason is kept
        return f"{type(exc).__name__}: {exc}"[:300]
    return ""


def _without(resolved: ResolvedSpace, name: str) -> ResolvedSpace:
    """``resolved`` with technique ``name`` (a key of :func:`_extremes`) taken out."""
    space = resolved.space
    zero = {"structured pruning": "structured_ratio", "head pruning": "head_ratio"}
    if name == "weight sparsity":
        return dataclasses.replace(resolved, unstructured_sparsity=FloatRange(low=0.0, high=0.0))
    if name in zero:
        fixed = getattr(space.pruning, zero[name]).model_copy(update={"low": 0.0, "high": 0.0})
        pruning = space.pruning.model_copy(update={zero[name]: fixed})
        return dataclasses.replace(resolved, space=space.model_copy(update={"pruning": pruning}))
    if name == "layer dropping":
        pruning = space.pruning.model_copy(update={"drop_blocks": IntRange(low=0, high=0)})
        return dataclasses.replace(resolved, space=space.model_copy(update={"pruning": pruning}))
    modes = tuple(m for m in resolved.modes if f"{m} int8" != name)
    if modes:
        return dataclasses.replace(resolved, modes=modes)
    return dataclasses.replace(
        resolved,
        layer_precisions={k: tuple(p for p in v if p != "int8") or v
                          for k, v in resolved.layer_precisions.items()},
        group_precisions={k: tuple(p for p in v if p != "int8") or v
                          for k, v in resolved.group_precisions.items()})
