"""How torch-pruning sees recurrent layers: one node each, whose input width it may thin.

torch-pruning traces a model through its autograd graph. On the CPU a GRU or an
``nn.RNN`` runs as stacks, slices and splits of autograd nodes, in which its index
mapping fails (IndexError), and it takes their weights for unwrapped parameters to
prune along their last dimension. While it traces, each recurrent layer here runs as
one autograd node (:func:`opaque_to_tracing`) with :class:`InputsPruner` as its
pruner: the layer feeding it is thinned together with its input columns, and its
hidden width is left to :mod:`search.trial.compress.recurrent`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["InputsPruner", "opaque_to_tracing"]


def _directions(rnn: nn.RNNBase) -> int:
    return 2 if rnn.bidirectional else 1


class InputsPruner(tp.pruner.BasePruningFunc):
    """torch-pruning's pruner for a recurrent layer: thins its input width (the first stacked
    layer's ``weight_ih`` columns, both directions) with the layer feeding it; its hidden
    width is never pruned there (the layer is among the ignored ones)."""

    def prune_out_channels(self, layer: nn.RNNBase, idxs: list[int]) -> nn.Module:
        raise NotImplementedError("recurrent hidden widths are pruned by prune_recurrent")

    def prune_in_channels(self, layer: nn.RNNBase, idxs: list[int]) -> nn.Module:
        keep = sorted(set(range(layer.weight_ih_l0.shape[1])) - set(idxs))
        for d in range(_directions(layer)):
            name = f"weight_ih_l0{'_reverse' if d else ''}"
            setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 1))
        layer.input_size = len(keep)  # (RNNBase.__setattr__ updated its flat weight list)
        return layer

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return layer.hidden_size * _directions(layer)

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return layer.weight_ih_l0.shape[1]


class _Opaque(torch.autograd.Function):
    """Runs a recurrent layer as one autograd node whose only input is the layer's input."""

    @staticmethod
    def forward(ctx, run, x):  # noqa: ANN001, ANN205 - autograd's signature
        output, state = run(x)
        return (output, *state) if isinstance(state, tuple) else (output, state)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        raise RuntimeError("only traced by torch-pruning, never differentiated")


def _opaque_forward(module: nn.RNNBase) -> Callable[..., object]:
    """``module``'s forward as one :class:`_Opaque` node (an initial state is passed in
    untraced: what produces it is no input width of the layer)."""
    forward = type(module).forward

    def run(x: object, hx: object = None) -> object:
        if not isinstance(x, torch.Tensor):  # a PackedSequence
            return forward(module, x, hx)
        output, *state = _Opaque.apply(lambda inputs: forward(module, inputs, hx), x)
        return output, tuple(state) if isinstance(module, nn.LSTM) else state[0]

    return run


@contextmanager
def opaque_to_tracing(model: nn.Module) -> Iterator[None]:
    """Recurrent layers run as one autograd node each while torch-pruning traces the model
    (its dependency graph is built then; pruning later uses that graph)."""
    patched = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    for module in patched:
        module.forward = _opaque_forward(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
