"""Layer dropping: the residual units a model can lose, found by their structure.

A residual unit computes ``x + f(x)``: without it the identity path still
carries ``x`` on, so the network runs with one unit fewer. Units come in two
kinds, whatever their classes are called:

- a *block*: a module whose own forward returns its input plus a branch computed
  from it (through activations, normalisation, dropout or a constant scale), and
  whose output has its input's shape (torchvision's BasicBlock, a user's
  ``Block1d`` or ``ResUnit``); :class:`DroppedBlock` replaces it and returns its input;
- an inline *branch*: a child ``f`` that its parent's forward adds back onto the
  value it was computed from (``x = x + self.mlp(x)``); :class:`DroppedBranch`
  replaces it and returns zero, so the parent adds nothing.

Each module's own forward is read with ``torch.fx``, its submodules as opaque
calls: a stage of residual blocks (a chain of them) is no block itself, and
the outermost residual unit is the one offered, never a unit nested in it.
Where tracing fails (control flow on tensor values, as in
``nn.TransformerEncoderLayer``), the class name decides for blocks
(torchvision's and PyTorch's names) and no branch is read.
"""

from __future__ import annotations

import inspect
import operator
import re
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from search.trial.compress._layers import observe

__all__ = ["DroppedBlock", "DroppedBranch", "drop_blocks", "droppable_blocks", "rank_blocks",
           "remove_blocks"]

Kind = Literal["block", "branch"]

_BLOCK_NAME = re.compile(r"(Block|Bottleneck|InvertedResidual|MBConv|EncoderLayer)$")
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
# ops that carry a value on, elementwise: they may follow a residual add, or precede a branch
_ELEMENTWISE = {F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.leaky_relu, F.elu,
                F.selu, F.dropout, F.sigmoid, F.tanh, torch.relu, torch.sigmoid, torch.tanh,
                "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_",
                "contiguous", "clone"}
_SCALES = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"}
# modules with parameters that still carry their input on: post-norm residuals end in one
_CARRIERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.PReLU,
             nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class DroppedBlock(nn.Identity):
    """What a dropped block leaves: returns its first input and ignores whatever else its
    container passes (``nn.TransformerEncoder`` calls layers with ``src_mask=...``)."""

    def forward(self, *args: object, **kwargs: object) -> object:
        return args[0] if args else next(iter(kwargs.values()))


class DroppedBranch(nn.Module):
    """What a dropped inline branch leaves: a 0-d zero for its parent to add (``x + 0``).

    A constant, not zeros of the input's shape: the exported graph keeps no work
    for the branch (ONNX Runtime removes an ``Add`` of a constant zero), and the
    layers that only fed the branch are dead code the exporter drops.
    """

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        return torch.zeros((), dtype=x.dtype, device=x.device)


class _Tracer(fx.Tracer):
    """Reads one module's own forward: every submodule is one opaque call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _operands(node: fx.Node) -> list[object]:
    """The two values a binary op combines, however it was written (``x + y``, ``x.add(y)``,
    ``torch.add(x, other=y)``)."""
    return [*node.args, *node.kwargs.values()][:2]


def _is(node: fx.Node, targets: set) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _trace(module: nn.Module) -> fx.Graph | None:
    """The module's own forward as a graph; None where torch.fx cannot read it.

    Read in eval mode (stochastic depth's training path reads shapes), with the
    forward's defaulted arguments bound (``mask=None`` takes its ``None`` branch);
    the module's attributes are restored after, since a forward that stores a value
    would otherwise keep a tracing proxy.
    """
    try:
        params = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    state = dict(module.__dict__)
    module.training = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _Tracer().trace(module, concrete_args=concrete or None)
    except Exception:  # any code torch.fx cannot follow: the structure is unknown
        return None
    finally:
        module.__dict__.clear()
        module.__dict__.update(state)


class _Reading:
    """One module's own forward, read as a graph: which values carry its input on (its
    *stream*), through how many residual adds, and which children are added back."""

    def __init__(self, module: nn.Module, graph: fx.Graph) -> None:
        self.module, self.graph = module, graph
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        self.reach: set[fx.Node] = set(inputs[:1])  # the values computed from the input
        for node in graph.nodes:  # a dropped branch's zero is a constant
            if any(arg in self.reach for arg in node.all_input_nodes) and not (
                    node.op == "call_module"
                    and isinstance(module.get_submodule(node.target), DroppedBranch)):
                self.reach.add(node)
        self.stream: dict[object, int] = {n: 0 for n in inputs[:1]}
        for node in graph.nodes:
            depth = self._residual_add(node) if _is(node, _ADDS) else self._carried(node)
            if depth is not None:
                self.stream[node] = depth

    def carries(self, node: object) -> fx.Node | None:
        """The value an op carries on unchanged in shape and meaning, or None: elementwise
        functions, a constant scale, normalisation, a submodule without parameters."""
        if not isinstance(node, fx.Node):
            return None
        if _is(node, _SCALES):
            computed = [a for a in _operands(node) if isinstance(a, fx.Node) and a in self.reach]
            return computed[0] if len(computed) == 1 else None
        carries = _is(node, _ELEMENTWISE) or node.op == "call_module" and (
            isinstance(sub := self.module.get_submodule(node.target), _CARRIERS)
            or not _has_params(sub))
        first = node.args[0] if node.args else None
        return first if carries and isinstance(first, fx.Node) else None

    def _carried(self, node: fx.Node) -> int | None:
        return self.stream.get(self.carries(node))

    def _residual_add(self, node: fx.Node) -> int | None:
        """The stream's residual adds so far, when ``node`` adds a branch computed from the
        input onto the stream (``x + x`` and ``x + bias`` are no residual)."""
        operands = _operands(node)
        for stream, branch in (operands, operands[::-1]) if len(operands) == 2 else ():
            if not (isinstance(stream, fx.Node) and isinstance(branch, fx.Node)):
                continue
            if stream in self.stream and branch in self.reach and self.stream.get(branch) != 0:
                return self.stream[stream] + 1
        return None

    def is_block(self) -> bool:
        """The forward returns its input plus at least one branch computed from it."""
        out = next(n for n in self.graph.nodes if n.op == "output").args[0]
        return isinstance(out, fx.Node) and self.stream.get(out, 0) >= 1

    def calls(self, target: str) -> bool:
        return any(n.op == "call_module" and n.target == target for n in self.graph.nodes)

    def branches(self) -> dict[str, list[str]]:
        """Children (their targets) whose every call is added back onto the value it was
        computed from, their output used by that add only; each with the children that
        only fed it (a pre-norm), which go with it."""
        found: dict[fx.Node, list[fx.Node]] = {}
        for node in self.graph.nodes:
            operands = _operands(node) if _is(node, _ADDS) else []
            for stream, branch in (operands, operands[::-1]) if len(operands) == 2 else ():
                if (call := self._branch_call(stream, branch)) is not None:
                    found[call[0]] = call[1]
                    break
        used = {n for call, feeders in found.items() for n in (call, *feeders)}
        shared = {n.target for n in self.graph.nodes if n.op == "call_module" and n not in used}
        return {n.target: [f.target for f in feeders if f.target not in shared]
                for n, feeders in found.items() if n.target not in shared}

    def _branch_call(self, stream: object, branch: object) -> tuple[fx.Node, list[fx.Node]] | None:
        """The call of a child with parameters that computes ``branch`` from ``stream``
        (through carrying ops on either side) and the calls with parameters that feed
        it alone; None where there is none."""
        node = branch
        while not (isinstance(node, fx.Node) and node.op == "call_module"
                   and _has_params(self.module.get_submodule(node.target))):
            if not isinstance(node, fx.Node) or len(node.users) != 1:
                return None
            node = self.carries(node)
        if len(node.users) != 1 or not isinstance(stream, fx.Node):
            return None
        source, feeders, alone = node.args[0] if node.args else None, [], True
        while source is not stream and source is not None:
            alone = alone and len(source.users) == 1
            if alone and source.op == "call_module" and _has_params(
                    self.module.get_submodule(source.target)):
                feeders.append(source)
            source = self.carries(source)
        return (node, feeders) if source is stream else None


class _Finder:
    """The droppable units of one model, read top-down: a unit's insides are not read."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.model = model
        self.kept = _kept_shapes(model, example)
        self.readings: dict[int, _Reading | None] = {}
        self.fallbacks: list[str] = []  # blocks whose class name decided: untraceable
        self.found: dict[str, Kind] = {}
        self.skip = _encoder_firsts(model)

    def units(self) -> dict[str, Kind]:
        """Every unit, in the order they run."""
        self._visit("", self.model)
        return {name: self.found[name] for name in self.kept if name in self.found}

    def read(self, module: nn.Module) -> _Reading | None:
        if id(module) not in self.readings:
            graph = _trace(module)
            self.readings[id(module)] = _Reading(module, graph) if graph is not None else None
        return self.readings[id(module)]

    def _visit(self, name: str, module: nn.Module) -> None:
        reading = self.read(module) if name in self.kept and any(module.children()) else None
        for target in reading.branches() if reading is not None else ():
            full = f"{name}.{target}" if name else target
            if self.kept.get(full):
                self.found[full] = "branch"
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full in self.found or full in self.skip:
                continue
            if self._is_block(full, child):
                self.found[full] = "block"
            else:
                self._visit(full, child)

    def _is_block(self, name: str, module: nn.Module) -> bool:
        """Ran keeping its input's shape, has weights to lose, and is residual by structure
        (by class name where its forward cannot be traced). torch's own layers are none."""
        if not self.kept.get(name) or not _has_params(module) or isinstance(
                module, DroppedBlock | DroppedBranch):
            return False
        if not any(module.children()) and type(module).__module__.startswith("torch."):
            return False
        reading = self.read(module)
        if reading is None:
            self.fallbacks.append(name)
            return bool(_BLOCK_NAME.search(type(module).__name__))
        return reading.is_block()


def _kept_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, bool]:
    """Each module that ran on ``example`` (in the order they finished): whether every call
    returned a tensor of its first input's shape."""
    kept: dict[str, bool] = {}

    def see(name: str, x: torch.Tensor | None, out: object) -> None:
        same = isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) \
            and x.shape == out.shape
        kept[name] = kept.get(name, True) and same

    observe(model, dict(model.named_modules()), see, example)
    return kept


def _encoder_firsts(model: nn.Module) -> set[str]:
    """First layers of ``nn.TransformerEncoder`` s: the encoder reads their attention's
    settings on every call, so they stay."""
    return {f"{name}.layers.0" if name else "layers.0" for name, m in model.named_modules()
            if isinstance(m, nn.TransformerEncoder)}


@torch.no_grad()
def droppable_blocks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The residual units (blocks and inline branches, see the module's notes) whose removal
    leaves the identity path, so the network still runs (layer dropping); in the order
    they run."""
    return list(_Finder(model, example).units())


@torch.no_grad()
def rank_blocks(model: nn.Module, inputs: torch.Tensor) -> list[str]:
    """The droppable residual units, the one that changes its input least first.

    Importance of a unit: how much it adds to the stream relative to it on
    ``inputs``, ``||f(x) - x||^2 / ||x||^2`` for a block ``f`` and
    ``||f(x)||^2 / ||x||^2`` for a branch (a unit that barely changes its input
    is the cheapest to lose).
    """
    units = _Finder(model, inputs[:1]).units()
    modules = dict(model.named_modules())
    change: dict[str, float] = {}

    def relative_change(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        added = out if units[name] == "branch" else out - x
        change[name] = float((added**2).sum() / (x**2).sum().clamp_min(1e-12))

    observe(model, {name: modules[name] for name in units}, relative_change, inputs)
    return sorted(change, key=change.get)


def _feeders(model: nn.Module, name: str) -> list[str] | None:
    """None for a block; for an inline branch, the layers that only fed it (a pre-norm).

    Read from the forward that calls ``name`` (the nearest enclosing module's that
    does), without an example: a trial drops the units its process ranked on another
    copy of the model.
    """
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut]))
        graph = _trace(owner)
        reading = _Reading(owner, graph) if graph is not None else None
        target = ".".join(parts[cut:])
        if reading is not None and reading.calls(target):
            feeders = reading.branches().get(target)
            return None if feeders is None else [".".join([*parts[:cut], f]) for f in feeders]
    return None


def remove_blocks(model: nn.Module, names: list[str]) -> list[str]:
    """Replace the named blocks by :class:`DroppedBlock` identities and the named inline
    branches by :class:`DroppedBranch` zeros, with the layers that only fed them (whose
    widths channel pruning could no longer follow); returns the names."""
    replacements: dict[str, nn.Module] = {}
    for name in names:
        feeders = _feeders(model, name)
        replacements[name] = DroppedBlock() if feeders is None else DroppedBranch()
        replacements.update((feeder, DroppedBlock()) for feeder in feeders or ())
    modules = dict(model.named_modules())
    for name, replacement in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, replacement)
    return list(names)


@torch.no_grad()
def drop_blocks(model: nn.Module, n: int, inputs: torch.Tensor) -> list[str]:
    """Drop the ``n`` least important residual units (:func:`rank_blocks` on ``inputs``);
    returns the dropped units' names."""
    if n <= 0:
        return []
    return remove_blocks(model, rank_blocks(model, inputs)[:n])
