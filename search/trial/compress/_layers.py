"""The layer types that carry a model's MACs: what gets a precision, zeros and a width;
and the hooked forward pass through which stages see where they run.

One definition, so that a volumetric or video model's ``nn.Conv3d`` is pruned,
sparsified and quantized by every stage alike (each stage once listed its own
types, and 3-D convolutions were left out of all of them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHTED = (*CONV, nn.Linear)
# get a precision (ONNX Runtime's dynamic int8 LSTM on CPUs; a GRU's int8 runs unrolled into
# MatMuls) and a hidden width (recurrent.py); no zeros of their own. nn.RNN gets a width only
RECURRENT = (nn.LSTM, nn.GRU)


@torch.no_grad()
def observe(model: nn.Module, modules: dict[str, nn.Module],
            see: Callable[[str, torch.Tensor | None, object], None], inputs: torch.Tensor) -> None:
    """One eval-mode forward pass calling ``see(name, input, output)`` for each module
    (each time it runs), so every stage reads execution order and shapes the same way."""
    hooks = [m.register_forward_hook(
        lambda mod, args, out, name=name: see(name, args[0] if args else None, out))
        for name, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
