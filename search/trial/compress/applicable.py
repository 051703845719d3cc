"""Which techniques a model offers, decided from its structure, with the reason when not.

The space only offers what the model can take (``ModelFacts`` carries the same
decisions into :func:`search.space.resolve.resolve_space`); the conformance tests use
this to tell "not offered, and why" from a technique that broke.
"""

from __future__ import annotations

import torch
from torch import nn

from search.trial.compress._layers import WEIGHTED
from search.trial.compress.blocks import droppable_blocks
from search.trial.compress.prune import attention_modules

__all__ = ["TECHNIQUES", "applicable"]

# the techniques of the space, at the granularity a user reads them
TECHNIQUES = ("structured", "drop_blocks", "heads", "sparsity", "int8_static", "int8_dynamic",
              "fp32")


def applicable(model: nn.Module, technique: str, example: torch.Tensor) -> tuple[bool, str]:
    """``(True, "")`` when ``technique`` applies to ``model``, else ``(False, reason)``."""
    if technique not in TECHNIQUES:
        raise ValueError(f"unknown technique {technique!r}; known: {', '.join(TECHNIQUES)}")
    weighted = sum(isinstance(m, WEIGHTED) for m in model.modules())
    widths = weighted + sum(isinstance(m, nn.RNNBase) for m in model.modules())  # hidden widths
    if technique == "drop_blocks" and not droppable_blocks(model, example):
        return False, "no residual block keeps its input's shape (nothing to drop to)"
    if technique == "heads" and not attention_modules(model):
        return False, "no multi-head attention"
    if technique == "structured" and widths < 2:
        return False, "only the classifier has a width, and it keeps it"
    if technique != "fp32" and not weighted:
        return False, "no Conv or Linear layer"
    return True, ""
