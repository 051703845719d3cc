"""Pruning: channels and attention heads (torch-pruning), weights; whole residual blocks
in :mod:`search.trial.compress.blocks`.

Structured pruning really removes channels, rounded to the profile's channel
multiple, since odd channel counts can run slower than the unpruned model.
Unstructured zeros only pay where the runtime has sparse kernels; the latency
measurement decides.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping

import torch
import torch_pruning as tp
from torch import nn

from search._base.names import CHANNEL_IMPORTANCES, SEGMENTS, ChannelImportance
from search.tasks import Loss, Split, classification_loss, logits_of
from search.trial.compress._layers import WEIGHTED, observe
from search.trial.compress._norms import GroupNormPruner
from search.trial.compress.blocks import (  # their home before blocks.py
    DroppedBlock,
    drop_blocks,
    droppable_blocks,
    rank_blocks,
    remove_blocks,
)
from search.trial.compress.heads import PrunedAttention, prune_heads
from search.trial.compress.recurrent import prune_recurrent, recurrent_ratios
from search.trial.compress.recurrent_tracing import InputsPruner, opaque_to_tracing

__all__ = [
    "DroppedBlock",
    "attention_modules",
    "SEGMENTS",
    "count_zero_fraction",
    "depth_segments",
    "drop_blocks",
    "droppable_blocks",
    "output_layer",
    "output_layers",
    "prune_structured",
    "prune_unstructured",
    "rank_blocks",
    "recalibrate_batchnorm",
    "remove_blocks",
]

_TAYLOR_CHUNK = 32  # inputs per backward pass when taylor importance takes its gradient


def _importance(name: ChannelImportance):  # noqa: ANN202
    """torch-pruning's importance for each name of ``CHANNEL_IMPORTANCES``."""
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    raise ValueError(f"unknown structured importance {name!r}; known: {', '.join(CHANNEL_IMPORTANCES)}")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's multi-head attention modules (whose heads can be removed)."""
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention | PrunedAttention)]


@torch.no_grad()
def depth_segments(model: nn.Module, example: torch.Tensor) -> dict[str, list[str]]:
    """The model's Conv/Linear layers in the order they run, cut into :data:`SEGMENTS` of
    about equal MACs (a layer belongs to the segment where its MACs start).

    Any architecture has an order of execution, so this needs no knowledge of
    its stages: ResNet's early third is its high-resolution convolutions, a
    transformer's is its first encoder layers. Channel pruning with a ratio
    per segment can thin where the compute is and spare what accuracy needs.
    """
    modules = {name: m for name, m in model.named_modules() if isinstance(m, WEIGHTED)}
    macs: dict[str, float] = {}

    def see(name: str, x: torch.Tensor | None, out: object) -> None:
        m = modules[name]
        if name in macs or not isinstance(out, torch.Tensor):
            return
        fan_in = m.weight[0].numel()  # in / groups x kernel for a conv, in for a Linear
        macs[name] = float(out.numel() // out.shape[0] * fan_in)

    observe(model, modules, see, example)
    total = sum(macs.values()) or 1.0
    out: dict[str, list[str]] = {s: [] for s in SEGMENTS}
    done = 0.0
    for name, cost in macs.items():
        index = min(int(len(SEGMENTS) * done / total), len(SEGMENTS) - 1)
        out[SEGMENTS[index]].append(name)
        done += cost
    return out


def prune_structured(model: nn.Module, example: torch.Tensor, ratio: float | Mapping[str, float],
                     round_to: int, keep: tuple[nn.Module, ...] = (), *,
                     importance: str = "magnitude", head_ratio: float = 0.0,
                     data: Split | None = None, loss: Loss = classification_loss,
                     segments: Mapping[str, list[str]] | None = None) -> nn.Module:
    """Remove channels and attention heads (``head_ratio``), in place.

    ``ratio`` is the share of channels removed from each layer group, or a ratio
    per depth segment (``{"early": 0.1, "late": 0.5}``, see :func:`depth_segments`;
    a segment left out keeps its width; ``segments`` as computed on the model
    before blocks were dropped, so "early" means the same layers in every
    trial; layers no longer there are skipped). torch-pruning's dependency graph keeps
    coupled layers consistent (a group spanning segments takes the ratio of the
    layer it starts at); channel counts are rounded to ``round_to``. ``keep``
    layers keep their output width; by default the classifier (the last layer to
    run) and the projections of already split attention, so hidden and
    feed-forward Linear widths are thinned. ``taylor`` scores need gradients of
    ``loss`` (the task's), taken from one batch of ``data``. Heads are removed
    whole, with their projections (:mod:`search.trial.compress.heads`). Recurrent layers
    lose the same share of their hidden units, by our own code
    (:mod:`search.trial.compress.recurrent`; with a ratio per segment, that of the segment
    of the first Conv/Linear to run after the layer), unless ``keep`` names them.
    """
    asked = ratio
    ratios: dict[tuple[nn.Module, ...], float] = {}  # torch-pruning's pruning_ratio_dict
    if isinstance(ratio, Mapping):
        unknown = set(ratio) - set(SEGMENTS)
        if unknown:
            raise ValueError(f"unknown depth segments {sorted(unknown)}; known: "
                             f"{', '.join(SEGMENTS)}")
        if any(r > 0 for r in ratio.values()):
            modules = dict(model.named_modules())
            segments = segments or depth_segments(model, example)
            for segment, r in ratio.items():
                present = tuple(modules[n] for n in segments.get(segment, ()) if n in modules)
                if r > 0 and present:
                    ratios[present] = r
        ratio = 0.0
    if ratio > 0 or ratios:
        kept = {id(m) for m in keep}
        if not keep:
            keep = _default_keep(model, example)
        recurrent = {name: r for name, r in recurrent_ratios(model, example, asked,
                                                             segments or {}).items()
                     if r > 0 and id(model.get_submodule(name)) not in kept}
        with warnings.catch_warnings(), opaque_to_tracing(model):
            # position embeddings, class tokens, layer scales: torch-pruning prunes their last
            # non-singleton dimension, the channel one in torchvision's and PyTorch's idioms
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            # its shape inference giving up inside a module it has no pruner for
            warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
            pruner = tp.pruner.MetaPruner(
                model,
                example,
                importance=_importance(importance),
                pruning_ratio=ratio,
                pruning_ratio_dict=ratios or None,
                # recurrent hidden widths are ours (prune_recurrent), whatever ``keep`` says
                ignored_layers=[*keep, *(m for m in model.modules() if isinstance(m, nn.RNNBase))],
                round_to=round_to,
                customized_pruners={**dict.fromkeys((nn.RNN, nn.GRU, nn.LSTM), InputsPruner()),
                                    nn.GroupNorm: GroupNormPruner()},
            )
        if importance == "taylor":
            if data is None:
                raise ValueError("taylor importance needs training data for its gradients")
            _taylor_gradients(model, data, loss)
        pruner.step()
        model.zero_grad(set_to_none=True)
        _check_runs(model, example)
        if recurrent:
            prune_recurrent(model, example, recurrent, round_to)
            _check_runs(model, example)
    prune_heads(model, head_ratio)
    return model


def _taylor_gradients(model: nn.Module, data: Split, loss: Loss = classification_loss,
                      samples: int = 128) -> None:
    """Leave in each parameter's ``.grad`` the gradient of the mean loss over ``samples``
    training inputs, taken a chunk at a time: a DenseNet at 32 px holds gigabytes of
    activations for 128 inputs at once (the same gradient in eval mode, as trials prune)."""
    model.zero_grad(set_to_none=True)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:samples]
    for chunk in idx.split(_TAYLOR_CHUNK):
        value = loss(logits_of(model(data.x[chunk])), data.y[chunk])
        (value * (len(chunk) / len(idx))).backward()


@torch.no_grad()
def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """Fail at pruning time, naming the cause, when the pruned model no longer runs (a width
    the model's code hardcodes, which torch-pruning cannot see)."""
    was_training = model.training
    try:
        model.eval()(example)
    except RuntimeError as exc:
        raise RuntimeError(f"the model no longer runs after channel pruning (a width its code "
                           f"hardcodes?): {exc}") from exc
    finally:
        model.train(was_training)


def _default_keep(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, ...]:
    """The layers whose width the model's contract fixes: the output layer (its width is the
    number of classes) and split attention's projections (their width is heads x head_dim;
    ``nn.MultiheadAttention`` itself is handled by torch-pruning); and recurrent layers'
    hidden width, from torch-pruning (it thins a one-layer LSTM's only, asserts on a stacked
    one and raises on a GRU; :func:`prune_recurrent` thins them; their input width is thinned
    with the layer feeding them)."""
    split = [sub for m in model.modules() if isinstance(m, PrunedAttention)
             for sub in m.modules() if isinstance(sub, nn.Linear)]
    output = [model.get_submodule(name) for name in output_layers(model, example)]
    recurrent = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    return (*output, *split, *recurrent, *_hardcoded_widths(model))


def _hardcoded_widths(model: nn.Module) -> list[nn.Module]:
    """Layers whose width the model's code reads from a number it stored: torchvision's
    VisionTransformer reshapes the patch embedding to ``self.hidden_dim``, so its residual
    stream keeps its width (the MLP hidden widths are still thinned). Looked up only where
    torchvision is already loaded: importing it costs seconds in every worker and CLI run."""
    vit = sys.modules.get("torchvision.models.vision_transformer")
    if vit is None:  # no torchvision model can exist in this process
        return []
    return [m.conv_proj for m in model.modules() if isinstance(m, vit.VisionTransformer)]


def output_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The name of the last Conv/Linear layer to run in a forward pass: the classifier, or
    a dense head's final convolution (None when there is none)."""
    ran: list[str] = []
    modules = {name: m for name, m in model.named_modules() if isinstance(m, WEIGHTED)}
    observe(model, modules, lambda name, x, out: ran.append(name), example)
    return ran[-1] if ran else None


def output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Every Conv/Linear layer whose output reaches the model's output through no other
    Conv/Linear: a classifier's last layer, and all of a dense head's final convolutions
    (a detector's class, box and centerness maps). Their widths are the model's contract
    (classes, box coordinates), and torch-pruning's dependency walk through the reshapes and
    concatenations after them takes minutes on a detector. Read from the autograd graph of the
    scored output (:func:`logits_of`) of one forward pass; the last layer to run where the
    graph cannot be had."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, WEIGHTED)}
    made: dict[object, str] = {}

    def see(name: str, x: torch.Tensor | None, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            made.setdefault(out.grad_fn, name)

    # hooks of its own, not _layers.observe: observe runs without gradients, and the graph is
    # what is read here
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: see(name, None, out))
             for name, m in modules.items()]
    was_training = model.training
    try:
        with torch.enable_grad():
            model.eval()
            # the scored output only: a model that also returns its features keeps them thin
            output = logits_of(model(example))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    found: list[str] = []
    seen: set[object] = set()
    frontier = [output.grad_fn] if output.grad_fn is not None else []
    while frontier:
        node = frontier.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in made:
            if made[node] not in found:
                found.append(made[node])
            continue
        frontier.extend(n for n, _ in node.next_functions)
    if not found:
        last = output_layer(model, example)
        return [last] if last is not None else []
    order = list(modules)
    return sorted(found, key=order.index)


def prune_unstructured(model: nn.Module, sparsity: float, criterion: str = "magnitude",
                       scope: str = "global", data: Split | None = None,
                       loss: Loss = classification_loss) -> nn.Module:
    """One-shot: zero the ``sparsity`` share of Conv/Linear weights with the lowest score."""
    from search.trial.compress.sparsity import Sparsifier, one_shot_scores

    sparsifier = Sparsifier(model, sparsity=sparsity, criterion=criterion, scope=scope)
    sparsifier.start(one_shot_scores(model, criterion, data, loss=loss), gradual=False)
    return model


def count_zero_fraction(model: nn.Module) -> float:
    """Share of exactly-zero weights over all Conv/Linear layers."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, WEIGHTED):
            w = module.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: torch.Tensor, batch_size: int = 128) -> nn.Module:
    """Re-estimate BatchNorm running statistics after channels or weights were removed.

    Pruning shifts every activation's distribution; stale BN statistics are the
    main reason one-shot pruned models collapse. A few forward passes fix that.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    model.train()
    for start in range(0, len(inputs), batch_size):
        model(inputs[start : start + batch_size])
    for m, momentum in saved:
        m.momentum = momentum
    return model.eval()
