"""Hidden-width pruning of recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``), our own code.

torch-pruning raises on a GRU, thins only a one-layer LSTM and asserts on a
stacked one, so it never prunes a recurrent layer's hidden width (the layers are
among its ignored ones, and :mod:`search.trial.compress.recurrent_tracing` shows
it each as one node whose input width it thins with the layer feeding it). Here
the same hidden units are removed from every gate's rows of ``weight_ih`` / ``weight_hh``
and the biases, from the columns of ``weight_hh``, from the next stacked layer's
input columns (both directions: its input is ``[forward H | backward H]``) and
from whatever reads the layer's output (found by :func:`readers`). The layer is
rebuilt as the same class with a smaller ``hidden_size``, so the export still
writes one native GRU/LSTM/RNN node per layer.

An LSTM with ``proj_size`` is left unpruned (its output width is the projection's,
not the hidden one: another coupling, not needed so far).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from search._base.names import SEGMENTS
from search.trial.compress._layers import WEIGHTED

__all__ = ["Reader", "hidden_units", "prune_recurrent", "readers", "rebuilt", "recurrent_ratios",
           "recurrent_widths"]

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
_READERS = (nn.Linear, nn.RNNBase)
Unit = tuple[int, int, int]  # (layer, direction, hidden unit)


def _directions(rnn: nn.RNNBase) -> int:
    return 2 if rnn.bidirectional else 1


def _suffix(layer: int, direction: int) -> str:
    return f"l{layer}{'_reverse' if direction else ''}"


def recurrent_widths(hidden: int, ratio: float, round_to: int) -> int:
    """The hidden width left after removing ``ratio`` of ``hidden`` units: rounded down to
    ``round_to`` as torch-pruning rounds channels, never below one multiple; ``hidden``
    itself when nothing is removed."""
    if ratio <= 0:
        return hidden
    keep = int(round(hidden * (1.0 - ratio), 6))
    keep = max(keep - keep % round_to, round_to)
    return min(keep, hidden)


def hidden_units(rnn: nn.RNNBase, keep: int) -> dict[tuple[int, int], torch.Tensor]:
    """The ``keep`` most important hidden units of each (layer, direction), sorted.

    A unit's importance is the L2 norm of the weights it owns: its rows in every gate of
    ``weight_ih`` and ``weight_hh`` and its column of ``weight_hh`` (what it feeds back).
    Every channel importance the search names (magnitude, taylor, lamp, bn_scale) maps to
    this one for recurrent layers: a gate has no BatchNorm scale, and one gradient batch
    says little about units that act over many steps.
    """
    size, gates = rnn.hidden_size, _GATES[rnn.mode]
    out = {}
    for layer in range(rnn.num_layers):
        for d in range(_directions(rnn)):
            s = _suffix(layer, d)
            w_ih = getattr(rnn, f"weight_ih_{s}").detach().reshape(gates, size, -1)
            w_hh = getattr(rnn, f"weight_hh_{s}").detach()
            score = (w_ih**2).sum((0, 2)) + (w_hh.reshape(gates, size, -1) ** 2).sum((0, 2)) \
                + (w_hh**2).sum(0)
            out[layer, d] = score.sqrt().topk(keep).indices.sort().values
    return out


def _gate_rows(units: torch.Tensor, size: int, gates: int) -> torch.Tensor:
    return torch.cat([units + g * size for g in range(gates)])


def rebuilt(rnn: nn.RNNBase, units: Mapping[tuple[int, int], torch.Tensor] | None = None,
            inputs: torch.Tensor | None = None) -> nn.RNNBase:
    """A new module of ``rnn``'s class keeping the given hidden ``units`` of each (layer,
    direction) (all: None) and the given columns of its input (all: None), with the kept
    weights copied: a real ``nn.GRU``/``nn.LSTM``/``nn.RNN``, so it exports as one."""
    size, gates, dirs = rnn.hidden_size, _GATES[rnn.mode], _directions(rnn)
    if units is None:
        every = torch.arange(size)
        units = {(layer, d): every for layer in range(rnn.num_layers) for d in range(dirs)}
    width = len(units[0, 0])
    first_in = rnn.weight_ih_l0.shape[1] if inputs is None else len(inputs)
    options = dict(num_layers=rnn.num_layers, bias=rnn.bias, batch_first=rnn.batch_first,
                   dropout=rnn.dropout, bidirectional=rnn.bidirectional)
    if isinstance(rnn, nn.RNN):
        options["nonlinearity"] = rnn.nonlinearity
    weight = rnn.weight_ih_l0
    new = type(rnn)(first_in, width, **options).to(weight.device, weight.dtype)
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            if layer == 0:
                columns = inputs if inputs is not None else torch.arange(weight.shape[1])
            else:
                columns = torch.cat([units[layer - 1, d] + d * size for d in range(dirs)])
            for d in range(dirs):
                s, rows = _suffix(layer, d), _gate_rows(units[layer, d], size, gates)
                getattr(new, f"weight_ih_{s}").copy_(getattr(rnn, f"weight_ih_{s}")[rows][:, columns])
                getattr(new, f"weight_hh_{s}").copy_(
                    getattr(rnn, f"weight_hh_{s}")[rows][:, units[layer, d]])
                if rnn.bias:
                    for kind in ("ih", "hh"):
                        getattr(new, f"bias_{kind}_{s}").copy_(getattr(rnn, f"bias_{kind}_{s}")[rows])
    return new.train(rnn.training)


@dataclass
class Reader:
    """A layer that reads a recurrent layer's output: for each of its input columns, the
    hidden unit it carries, or None where the column does not come from the recurrent layer."""

    name: str
    columns: list[Unit | None]


# two codings of a unit's index i as a float that selections (indexing, slicing, reshapes,
# concatenation, means over steps) carry unchanged and arithmetic does not: base + i x step
_CODINGS = ((4096.25, 1.0), (16384.75, 2.0))


def _coded(rnn: nn.RNNBase, out: object, coding: tuple[float, float]) -> object:
    """``rnn``'s outputs with every value replaced by the code of the hidden unit it is:
    the output's columns are the last layer's units, ``h_n`` (and ``c_n``) index them all
    (unit index: (layer x directions + direction) x hidden + unit)."""
    base, step = coding
    size, dirs, layers = rnn.hidden_size, _directions(rnn), rnn.num_layers
    output, state = out  # type: ignore[misc]
    if not isinstance(output, torch.Tensor):  # a PackedSequence: its columns are not coded
        raise TypeError("recurrent output is not a tensor")
    last = (layers - 1) * dirs * size
    columns = torch.arange(last, last + dirs * size, dtype=output.dtype, device=output.device)
    coded = (base + step * columns).expand_as(output).clone()

    def states(h: torch.Tensor) -> torch.Tensor:
        index = torch.arange(layers * dirs * size, dtype=h.dtype, device=h.device)
        return (base + step * index.reshape(layers * dirs, *[1] * (h.dim() - 2), size)) \
            .expand_as(h).clone()

    return coded, tuple(states(h) for h in state) if isinstance(state, tuple) else states(state)


def _decode(values: torch.Tensor, coding: tuple[float, float], units: int) -> int | None:
    """The unit index all of ``values`` code, or None."""
    base, step = coding
    index = (values - base) / step
    first = index.reshape(-1)[0]
    if not bool((index == first).all()) or first != first.round() or not 0 <= first < units:
        return None
    return int(first)


def _unit(rnn: nn.RNNBase, index: int) -> Unit:
    size, dirs = rnn.hidden_size, _directions(rnn)
    return index // (dirs * size), index // size % dirs, index % size


@torch.no_grad()
def _run(model: nn.Module, example: torch.Tensor, rnn: nn.RNNBase,
         coding: tuple[float, float] | None, reference: dict[str, list[object]] | None,
         ) -> tuple[dict[str, list[tuple]], object, int]:
    """One eval-mode pass: the positional and keyword arguments each reader got per call,
    the model's output and how often ``rnn`` ran. With ``coding``, ``rnn`` returns codes
    and each reader returns its output of the ``reference`` pass, so that codes stop at the
    first layer that reads them."""
    seen: dict[str, list[tuple]] = {}
    calls = [0]
    modules = {name: m for name, m in model.named_modules() if isinstance(m, _READERS)}
    hooks = []

    def on_rnn(module: nn.Module, args: tuple, kwargs: dict, out: object) -> object:
        calls[0] += 1
        if _tensors(args[1:]) or _tensors(kwargs):  # an initial state made elsewhere, as wide
            calls[0] += 1  # as the layer: counted as unsafe, like a second call
        return _coded(rnn, out, coding) if coding is not None else None

    def on_reader(name: str, args: tuple, kwargs: dict, out: object) -> object:
        seen.setdefault(name, []).append((args, kwargs))
        if reference is not None:
            return reference[name][len(seen[name]) - 1]
        return None

    for name, module in modules.items():
        if module is rnn:
            hooks.append(module.register_forward_hook(on_rnn, with_kwargs=True))
            continue
        hooks.append(module.register_forward_hook(
            lambda m, a, k, o, name=name: on_reader(name, a, k, o), with_kwargs=True))
        if reference is None:
            hooks.append(module.register_forward_hook(
                lambda m, a, o, name=name: seen.setdefault(f"{name}#out", []).append(o)))
    training = model.training
    try:
        output = model.eval()(example)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return seen, output, calls[0]


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    return []


def _same(a: object, b: object) -> bool:
    left, right = _tensors(a), _tensors(b)
    return len(left) == len(right) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(left, right, strict=True))


def readers(model: nn.Module, rnn_name: str, example: torch.Tensor) -> list[Reader] | None:
    """The Linear and recurrent layers that read ``rnn_name``'s output (typically a head on
    ``output[:, -1]`` or ``h_n[-1]``, or the next recurrent layer), each with the hidden unit
    behind each of its input columns; None when that is not known safely.

    Two passes replace the layer's outputs with codes of the unit each value is, the
    readers' outputs with their normal ones: a reader's input column that differs between
    the passes must carry one unit's code unchanged. Anything else (the output transformed
    before a reader, a LayerNorm or a convolution on it, a reader's initial state taken
    from it, the codes reaching the model's output, the layer running twice or from an
    initial state made elsewhere) is not safe.
    """
    rnn = model.get_submodule(rnn_name)
    units = rnn.num_layers * _directions(rnn) * rnn.hidden_size
    if units > 2**16 or getattr(rnn, "proj_size", 0):
        return None
    reference, _, calls = _run(model, example, rnn, None, None)
    outputs = {name[:-4]: v for name, v in reference.items() if name.endswith("#out")}
    try:
        (a, out_a, calls_a), (b, out_b, _) = (_run(model, example, rnn, c, outputs)
                                              for c in _CODINGS)
    except (TypeError, RuntimeError, ValueError, IndexError):  # codes the model cannot take
        return None
    if calls != 1 or calls_a != 1 or not _same(out_a, out_b):
        return None
    found = []
    for name in a:
        if name.endswith("#out"):
            continue
        if len(a[name]) != 1 or len(b.get(name, ())) != 1:
            if any(not _same(x, y) for x, y in zip(a[name], b.get(name, []), strict=False)):
                return None
            continue
        (args_a, kw_a), (args_b, kw_b) = a[name][0], b[name][0]
        if not args_a or not _same(args_a[1:], args_b[1:]) or not _same(kw_a, kw_b):
            return None  # a reader's state or options taken from the recurrent layer
        reader = _columns(rnn, args_a[0], args_b[0], units)
        if reader is None or (any(reader) and getattr(model.get_submodule(name), "proj_size", 0)):
            return None
        if any(c is not None for c in reader):
            found.append(Reader(name, reader))
    return found


def _columns(rnn: nn.RNNBase, x_a: torch.Tensor, x_b: torch.Tensor,
             units: int) -> list[Unit | None] | None:
    """The unit behind each column of a reader's input (None: independent of the layer)."""
    if not isinstance(x_a, torch.Tensor) or x_a.shape != x_b.shape or x_a.dim() == 0:
        return None
    columns: list[Unit | None] = []
    for j in range(x_a.shape[-1]):
        ca, cb = x_a[..., j], x_b[..., j]
        if torch.equal(ca, cb):
            columns.append(None)
            continue
        index = _decode(ca, _CODINGS[0], units)
        if index is None or _decode(cb, _CODINGS[1], units) != index:
            return None
        columns.append(_unit(rnn, index))
    return columns


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``model`` holds ``old`` (a module may sit under several names)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if module is old and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)


def _kept_columns(columns: list[Unit | None], units: dict[tuple[int, int], torch.Tensor],
                  ) -> torch.Tensor:
    kept = {(layer, d): set(u.tolist()) for (layer, d), u in units.items()}
    return torch.tensor([j for j, c in enumerate(columns)
                         if c is None or c[2] in kept[c[0], c[1]]], dtype=torch.long)


def _thin_reader(model: nn.Module, reader: Reader, units: dict[tuple[int, int], torch.Tensor],
                 ) -> None:
    """Remove from ``reader`` the input columns of the removed hidden units."""
    module = model.get_submodule(reader.name)
    columns = _kept_columns(reader.columns, units)
    if isinstance(module, nn.Linear):
        module.weight = nn.Parameter(module.weight.detach()[:, columns.to(module.weight.device)])
        module.in_features = len(columns)
    else:
        _replace(model, module, rebuilt(module, inputs=columns))


def prune_recurrent(model: nn.Module, example: torch.Tensor, ratios: Mapping[str, float],
                    round_to: int) -> dict[str, int]:
    """Remove ``ratios[name]`` of the hidden units of each named recurrent layer (every
    stacked layer and direction alike: they share ``hidden_size``), with the input columns
    of what reads them, in place; returns the new widths of the layers pruned.

    A layer whose readers are not known safely (:func:`readers`) keeps its width: a stacked
    layer's inner layers cannot be thinner than its last, which the consumer fixes. Layers
    are pruned in the order they run, each found in the model as it is by then.
    """
    widths: dict[str, int] = {}
    if not any(r > 0 for r in ratios.values()):
        return widths
    for name in _run_order(model, example, set(ratios)):
        rnn = model.get_submodule(name)
        keep = recurrent_widths(rnn.hidden_size, ratios[name], round_to)
        if keep >= rnn.hidden_size or getattr(rnn, "proj_size", 0):
            continue
        found = readers(model, name, example)
        if found is None:
            continue
        units = hidden_units(rnn, keep)
        for reader in found:
            _thin_reader(model, reader, units)
        _replace(model, model.get_submodule(name), rebuilt(model.get_submodule(name), units))
        widths[name] = keep
    return widths


@torch.no_grad()
def _run_order(model: nn.Module, example: torch.Tensor, wanted: set[str] | None = None,
               types: tuple[type[nn.Module], ...] = (nn.RNNBase,)) -> list[str]:
    """Names of the modules of ``types`` (among ``wanted``) in the order they first run."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, name=name: order.append(name))
             for name, m in model.named_modules()
             if isinstance(m, types) and (wanted is None or name in wanted)]
    training = model.training
    try:
        model.eval()(example)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def recurrent_ratios(model: nn.Module, example: torch.Tensor, ratio: float | Mapping[str, float],
                     segments: Mapping[str, list[str]]) -> dict[str, float]:
    """The share of hidden units each recurrent layer loses: ``ratio``, or with a ratio per
    depth segment the ratio of the segment where the layer runs. Depth segments count
    Conv/Linear layers only, so a recurrent layer takes the segment of the first of them
    to run after it (the one that reads it, in the usual model), else of the last before
    it, else the largest ratio given."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    if not names:
        return {}
    if not isinstance(ratio, Mapping):
        return {name: float(ratio) for name in names}
    segment_of = {layer: s for s in SEGMENTS for layer in segments.get(s, ())}
    order = _run_order(model, example, None, (nn.RNNBase, *WEIGHTED))
    out = {}
    for name in names:
        at = order.index(name) if name in order else len(order)
        after = [segment_of[n] for n in order[at + 1:] if n in segment_of]
        before = [segment_of[n] for n in order[:at] if n in segment_of]
        segment = after[0] if after else before[-1] if before else None
        out[name] = ratio.get(segment, 0.0) if segment else max(ratio.values(), default=0.0)
    return out
