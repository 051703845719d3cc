"""A GRU written out as MatMuls, so that ONNX Runtime can run it in int8.

ONNX Runtime has an int8 LSTM (DynamicQuantizeLSTM) but no int8 GRU: its GRU
node runs in float only. A GRU layer planned int8 is therefore exported as
:class:`UnrolledGRU` (swapped in for the export only, :func:`unrolled`): the
input projection of every step in one MatMul, the recurrent projection one
MatMul per step, the gates as Sigmoid/Tanh. Its MatMuls are then quantized as
any int8 MatMul layer is (MatMulInteger, or static QDQ) while its gates stay
fp32. Whether that beats the native fp32 GRU node depends on the width and the
machine (per-step quantization overhead against cheaper products), so the
latency measurement of each trial decides.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["UnrolledGRU", "unrolled"]


class UnrolledGRU(nn.Module):
    """``nn.GRU``'s computation (PyTorch's gate formulas, the reset gate applied after the
    recurrent product), stacked and bidirectional alike, as plain tensor operations.

    The weights are stored transposed (input x 3H), so each product exports as a MatMul on
    a constant initializer: the form ONNX Runtime's quantizers take. It returns what
    ``nn.GRU`` returns, ``(output, h_n)``; the number of steps is fixed when exported.
    """

    def __init__(self, gru: nn.GRU) -> None:
        super().__init__()
        if not isinstance(gru, nn.GRU):
            raise TypeError(f"UnrolledGRU unrolls an nn.GRU, got {type(gru).__name__}")
        self.input_size, self.hidden_size = gru.input_size, gru.hidden_size
        self.num_layers, self.bidirectional = gru.num_layers, gru.bidirectional
        self.batch_first, self.dropout, self.bias = gru.batch_first, gru.dropout, gru.bias
        self.directions = 2 if gru.bidirectional else 1
        size = gru.hidden_size
        for suffix in self._suffixes():
            w_ih, w_hh = (getattr(gru, f"weight_{k}_{suffix}").detach() for k in ("ih", "hh"))
            b_ih, b_hh = (getattr(gru, f"bias_{k}_{suffix}").detach() if gru.bias
                          else w_ih.new_zeros(3 * size) for k in ("ih", "hh"))
            # the recurrent bias of the reset and update gates joins the input bias (added once
            # for every step); only the new gate's stays apart, inside the reset product
            folded = b_ih + torch.cat([b_hh[: 2 * size], b_hh.new_zeros(size)])
            for name, value in (("w_ih", w_ih.t()), ("w_hh", w_hh.t()), ("b_ih", folded),
                                ("b_hn", b_hh[2 * size :])):
                self.register_parameter(f"{name}_{suffix}", nn.Parameter(value.contiguous().clone()))
        self.train(gru.training)

    def _suffixes(self) -> list[str]:
        return [f"l{layer}{'_reverse' if d else ''}" for layer in range(self.num_layers)
                for d in range(self.directions)]

    def forward(self, x: torch.Tensor,
                hx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.batch_first:
            x = x.transpose(0, 1)
        finals, layer_in = [], x
        for layer in range(self.num_layers):
            outputs = []
            for d in range(self.directions):
                index = layer * self.directions + d
                h0 = hx[index] if hx is not None else None
                sequence, last = self._direction(layer_in, h0, f"l{layer}{'_reverse' if d else ''}",
                                                 reverse=bool(d))
                outputs.append(sequence)
                finals.append(last)
            layer_in = torch.cat(outputs, -1) if len(outputs) > 1 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        out = layer_in if self.batch_first else layer_in.transpose(0, 1)
        return out, torch.stack(finals)

    def _direction(self, x: torch.Tensor, h: torch.Tensor | None, suffix: str, *,
                   reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer in one direction over ``x`` (N, T, I): its outputs (N, T, H) and last
        state. A missing initial state is zero: the first step then needs no recurrent
        product (and no zero tensor sized by the batch, which tracing would fix at 1)."""
        size = self.hidden_size
        w_hh, b_hn = getattr(self, f"w_hh_{suffix}"), getattr(self, f"b_hn_{suffix}")
        projected = torch.matmul(x, getattr(self, f"w_ih_{suffix}")) + getattr(self, f"b_ih_{suffix}")
        inputs_rz, inputs_n = projected.split([2 * size, size], -1)  # every step at once
        steps = x.shape[1]
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        sequence: list[torch.Tensor] = [x] * steps
        for t in order:
            if h is None:  # a zero state: the recurrent product is zero
                r, z = torch.sigmoid(inputs_rz[:, t]).split([size, size], -1)
                n = torch.tanh(inputs_n[:, t] + r * b_hn)
                h = n - z * n
            else:  # no bias right after the MatMul, which ONNX tools would fuse into a Gemm
                recurrent_rz, recurrent_n = torch.matmul(h, w_hh).split([2 * size, size], -1)
                r, z = torch.sigmoid(inputs_rz[:, t] + recurrent_rz).split([size, size], -1)
                n = torch.tanh(inputs_n[:, t] + r * (recurrent_n + b_hn))
                h = n + z * (h - n)  # (1 - z) * n + z * h
            sequence[t] = h
        return torch.stack(sequence, 1), h


@contextmanager
def unrolled(model: nn.Module, names: Collection[str]) -> Iterator[nn.Module]:
    """``model`` with the named ``nn.GRU`` layers replaced by :class:`UnrolledGRU` (for an
    export); the GRUs are put back on leaving, so the model is unchanged afterwards."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            original = getattr(owner, child)
            setattr(owner, child, UnrolledGRU(original))
            swapped.append((owner, child, original))
        yield model
    finally:
        for owner, child, original in reversed(swapped):
            setattr(owner, child, original)
