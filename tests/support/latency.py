"""Models the latency tests cost, shared by their modules."""

import onnx
import torch

from search._base.records import Choices
from search.trial.compress import apply_precision_plan, export_onnx, onnx_node_names
from tests.support.profiles import host_reduce_range


def fp32_and_int8(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """The model exported in fp32 and with every Conv/Linear in int8 (QDQ), as a trial does."""
    from search.trial.compress import compressible_layers
    from search.trial.compress.heads import prune_heads

    model.eval()
    prune_heads(model, 0.0, always=True)  # attention as its own MatMuls, as a trial has it
    layers = compressible_layers(model)
    fp32 = export_onnx(model, shape)
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    plan = {layer.name: "int8" for layer in layers}
    return fp32, apply_precision_plan(fp32, plan, names, Choices(precisions=plan),
                                      torch.randn(16, *shape), reduce_range=host_reduce_range())
