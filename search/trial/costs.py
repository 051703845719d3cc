"""A PyTorch model's layer costs for the latency model, read off one forward pass.

The latency package reads ONNX graphs; this is the torch-side entry for a model that was
never exported (a published architecture sized on the ``meta`` device).
"""

from __future__ import annotations

import torch

from search.latency.costing import LayerCost
from search.trial.compress._layers import CONV, WEIGHTED

__all__ = ["costs_from_torch"]


def costs_from_torch(model, input_shape: tuple[int, ...], batch: int,  # noqa: ANN001
                     precision: str = "fp32", device: str = "cpu") -> list[LayerCost]:
    """Layer costs of a PyTorch model's Conv/Linear layers, without exporting it.

    ``device="meta"`` sizes a large model without allocating or computing anything (the
    published-table check of the latency model costs ResNet-50 at batch 8 this way).
    """
    conv, weighted = CONV, WEIGHTED
    costs: list[LayerCost] = []

    def hook(module, inputs, output):  # noqa: ANN001, ANN202
        x = inputs[0]
        w = module.weight
        if isinstance(module, conv):
            macs = output.numel() // output.shape[1] * w.numel()
            op = "Conv"
        else:
            macs = x.numel() // x.shape[-1] * w.numel()
            op = "Gemm"
        costs.append(LayerCost(name=module._cost_name, op_type=op, precision=precision,
                               macs=int(macs), weight_elems=w.numel(), in_elems=x.numel(),
                               out_elems=output.numel()))

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, weighted):
            module._cost_name = name
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return costs
