"""Quantization-aware training: fake int8 quantization during the fine-tune.

The fake-quantized PyTorch graph is never exported (such graphs often fail to
export). Instead the weights are trained through a straight-through fake
quantizer on exactly the grid ONNX Runtime will use (symmetric, scale =
max|w| / 127, per output channel or per tensor), so after training they are
int8 values times a scale, and the ONNX quantizer recovers them losslessly.
Activations entering each int8 layer are fake-quantized with running min/max
ranges, so the network also learns to live with activation rounding; the ONNX
calibration then sets the deployed activation ranges.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from search.trial.compress._layers import WEIGHTED

__all__ = ["FakeQuant"]


def _fake_weight(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    if per_channel:
        absmax = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
        scale = (absmax / 127).reshape(-1, *([1] * (w.dim() - 1)))
    else:
        scale = (w.detach().abs().max().clamp_min(1e-12) / 127)
    q = torch.clamp(torch.round(w / scale), -127, 127) * scale
    return w + (q - w).detach()  # straight-through estimator


class _WeightQuant(nn.Module):
    def __init__(self, per_channel: bool) -> None:
        super().__init__()
        self.per_channel = per_channel

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _fake_weight(w, self.per_channel)


class _ActivationQuant:
    """Running min/max of a layer's input; fake-quantize to uint8 (or symmetric int8)."""

    def __init__(self, symmetric: bool, momentum: float = 0.1) -> None:
        self.symmetric, self.momentum = symmetric, momentum
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        if module.training:
            lo, hi = x.detach().min().clamp(max=0), x.detach().max().clamp(min=0)
            if self.low is None:
                self.low, self.high = lo, hi
            else:
                self.low = self.low + self.momentum * (lo - self.low)
                self.high = self.high + self.momentum * (hi - self.high)
        if self.low is None:
            return args
        if self.symmetric:
            bound = torch.maximum(self.high, -self.low).clamp_min(1e-8)
            scale, zero, qmin, qmax = bound / 127, torch.zeros(()), -127, 127
        else:
            scale = ((self.high - self.low) / 255).clamp_min(1e-8)
            zero, qmin, qmax = torch.round(-self.low / scale), 0, 255
        q = (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale
        return (x + (q - x).detach(), *args[1:])


class FakeQuant:
    """Fake-quantizes the given Conv/Linear layers for a fine-tune; a training hook."""

    def __init__(self, model: nn.Module, layers: list[str], *, per_channel: bool,
                 activation_symmetric: bool) -> None:
        modules = dict(model.named_modules())
        # Conv/Linear only: an int8 LSTM is quantized per run (DynamicQuantizeLSTM), with no
        # static ranges to learn, and has no single ``weight`` to fake-quantize
        self.modules = [modules[name] for name in layers
                        if name in modules and isinstance(modules[name], WEIGHTED)]
        self.handles = []
        for module in self.modules:
            parametrize.register_parametrization(module, "weight", _WeightQuant(per_channel))
            self.handles.append(module.register_forward_pre_hook(
                _ActivationQuant(activation_symmetric)))

    def on_backward(self) -> None:
        pass

    def on_step(self, progress: float) -> None:
        pass

    def finish(self) -> None:
        """Bake the quantized weights in and remove every hook (before export)."""
        for handle in self.handles:
            handle.remove()
        for module in self.modules:
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.handles, self.modules = [], []
