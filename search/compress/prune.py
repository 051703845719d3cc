"""Pruning: structured channel removal (torch-pruning) and unstructured magnitude masks.

Structured pruning really removes channels, rounded to the profile's channel
multiple, since odd channel counts can run slower than the unpruned model.
Unstructured zeros only pay where the runtime has sparse kernels; the latency
measurement decides.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune

__all__ = [
    "count_zero_fraction",
    "prune_structured",
    "prune_unstructured",
    "recalibrate_batchnorm",
    "remove_masks",
]

_WEIGHTED = (nn.Conv2d, nn.Linear)


def prune_structured(model: nn.Module, example: torch.Tensor, ratio: float,
                     round_to: int, keep: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Remove a ``ratio`` of output channels per layer group, in place, by L2 magnitude.

    ``keep`` layers (the classifier by default) keep their output width.
    """
    if ratio <= 0:
        return model
    if not keep:
        keep = tuple(m for m in model.modules() if isinstance(m, nn.Linear))
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=list(keep),
        round_to=round_to,
    )
    pruner.step()
    return model


def prune_unstructured(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the smallest-magnitude ``sparsity`` share of all Conv/Linear weights (global).

    The mask stays attached (``weight_orig`` * ``weight_mask``) so fine-tuning keeps
    the zeros; call :func:`remove_masks` before export.
    """
    if sparsity <= 0:
        return model
    params = [(m, "weight") for m in model.modules() if isinstance(m, _WEIGHTED)]
    torch_prune.global_unstructured(
        params, pruning_method=torch_prune.L1Unstructured, amount=float(sparsity)
    )
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake pruning masks into plain weights."""
    for module in model.modules():
        if isinstance(module, _WEIGHTED) and torch_prune.is_pruned(module):
            torch_prune.remove(module, "weight")
    return model


def count_zero_fraction(model: nn.Module) -> float:
    """Share of exactly-zero weights over all Conv/Linear layers."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, _WEIGHTED):
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
