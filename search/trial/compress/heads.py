"""Attention-head pruning for models built on ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` ties the inner width to the model width
(``embed_dim == num_heads * head_dim``), so heads cannot be removed from it in
place; torch-pruning can only shrink its embedding dimension. Each attention
module is therefore replaced by :class:`PrunedAttention`: separate q/k/v/out
projections holding only the kept heads, so the attention really costs less
(fewer MatMul columns, fewer softmax rows) and exports as plain MatMul/Softmax.
Heads are ranked by the L2 norm of their q, k, v rows and out-projection
columns (magnitude importance), per module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrunedAttention", "prune_heads"]


class PrunedAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` each, any inner width.

    Call-compatible with ``nn.MultiheadAttention`` as ``nn.TransformerEncoderLayer``
    uses it (returns ``(output, None)``; no attention weights).
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, batch_first: bool,
                 bias: bool = True) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        # attributes nn.TransformerEncoderLayer inspects before choosing its fused fast path;
        # these make it take the ordinary path, which calls forward()
        self.in_proj_bias = None
        self._qkv_same_embed_dim = False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n, _ = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if attn_mask is not None:
            scores = scores + (attn_mask if attn_mask.dtype != torch.bool
                               else torch.zeros_like(attn_mask, dtype=scores.dtype)
                               .masked_fill(attn_mask, float("-inf")))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :].bool(), float("-inf"))
        out = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _split(mha: nn.MultiheadAttention) -> tuple[torch.Tensor, ...]:
    """q, k, v weights (out, in) and biases of an ``nn.MultiheadAttention`` or a PrunedAttention."""
    if isinstance(mha, PrunedAttention):
        bias = mha.q_proj.bias is not None
        return (mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight,
                mha.q_proj.bias if bias else None, mha.k_proj.bias if bias else None,
                mha.v_proj.bias if bias else None)
    if not mha._qkv_same_embed_dim:
        w = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    else:
        w = mha.in_proj_weight.chunk(3, dim=0)
    b = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    return (*w, *b)


@torch.no_grad()
def prune_heads(model: nn.Module, ratio: float, *, always: bool = False) -> dict[str, int]:
    """Remove the ``ratio`` least important heads of every attention module (at least one
    head stays). Returns the heads left per module.

    ``always`` replaces ``nn.MultiheadAttention`` even when no head goes, so that
    every projection exports as its own MatMul that can get a precision.
    """
    if ratio <= 0 and not always:
        return {}
    left = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.MultiheadAttention | PrunedAttention):
            continue
        h, d = module.num_heads, module.head_dim
        wq, wk, wv, bq, bk, bv = _split(module)
        wo = module.out_proj.weight
        importance = sum(w.reshape(h, d, -1).pow(2).sum((1, 2)) for w in (wq, wk, wv))
        importance = importance + wo.reshape(wo.shape[0], h, d).pow(2).sum((0, 2))
        keep_n = max(1, h - int(ratio * h))
        keep = importance.topk(keep_n).indices.sort().values
        rows = (keep[:, None] * d + torch.arange(d)).flatten()
        new = PrunedAttention(module.embed_dim, keep_n, d,
                              batch_first=getattr(module, "batch_first", False),
                              bias=bq is not None)
        for proj, w, b in ((new.q_proj, wq, bq), (new.k_proj, wk, bk), (new.v_proj, wv, bv)):
            proj.weight.copy_(w[rows])
            if b is not None:
                proj.bias.copy_(b[rows])
        new.out_proj.weight.copy_(wo[:, rows])
        if module.out_proj.bias is not None:
            new.out_proj.bias.copy_(module.out_proj.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new.train(module.training))
        left[name] = keep_n
    return left
