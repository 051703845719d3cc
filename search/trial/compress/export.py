"""Export to ONNX (fp32; precision is applied in ONNX, not in PyTorch).

Fake-quantized PyTorch graphs often fail to export, so a trial always exports
the fp32 (pruned, fine-tuned) model and quantizes the ONNX graph afterwards.
``onnx_node_names`` keeps the mapping from PyTorch module names to ONNX node
names that ``nodes_to_exclude`` needs.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping

import onnx
import torch
from torch import nn

from search._base.errors import TrialError
from search._base.records import Layer
from search.trial.compress._layers import CONV, RECURRENT
from search.trial.compress.unrolled import unrolled

__all__ = ["OPSET", "compressible_layers", "export_onnx", "onnx_node_names"]

OPSET = 17
# a Linear on a batch of vectors exports as Gemm, on a sequence (3-D input) as MatMul + Add;
# a stacked LSTM or GRU as one node per layer (the first is the layer's node name), a GRU
# planned int8 as MatMuls (exported unrolled: the first is the layer's node name)
_NODE_TYPES = {"Conv": ("Conv",), "Gemm": ("Gemm", "MatMul"), "LSTM": ("LSTM",),
               "GRU": ("GRU", "MatMul")}
_OP_TYPES: tuple[tuple[type[nn.Module], str], ...] = (*((conv, "Conv") for conv in CONV),
                                                     (nn.Linear, "Gemm"),
                                                     *((rnn, rnn.__name__) for rnn in RECURRENT))


def compressible_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[Layer]:
    """The layers that get a precision each: Conv1d/2d/3d as ``Conv``, Linear as ``Gemm``,
    LSTM as ``LSTM``, GRU as ``GRU``.

    With ``example``, only those that run in an eval-mode forward pass of it: the
    auxiliary classifiers of torchvision's GoogLeNet and Inception v3 serve training
    only, are not in the exported model, and have no precision to choose.
    """
    layers = []
    for name, module in model.named_modules():
        for cls, op_type in _OP_TYPES:
            if isinstance(module, cls):
                layers.append(Layer(name, op_type))
    if example is None:
        return layers
    modules, ran = dict(model.named_modules()), set()
    handles = [modules[layer.name].register_forward_hook(
        lambda *_, name=layer.name: ran.add(name)) for layer in layers]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return [layer for layer in layers if layer.name in ran]


def export_onnx(model: nn.Module, input_shape: tuple[int, ...],
                dtype: torch.dtype = torch.float32,
                precisions: Mapping[str, str] | None = None) -> bytes:
    """Export ``model`` (eval mode, BatchNorm folded into Conv) with a dynamic batch axis;
    its input is ``dtype`` (float32, or int64 for a model that takes token ids).

    GRU layers that ``precisions`` (the trial's plan) puts in anything but fp32 export
    unrolled into MatMuls (:mod:`search.trial.compress.unrolled`): ONNX Runtime has no
    quantized GRU node.
    """
    model = model.eval()
    example = torch.zeros(1, *input_shape, dtype=dtype)
    buffer = io.BytesIO()
    modules = dict(model.named_modules())
    unroll = [name for name, p in (precisions or {}).items()
              if p != "fp32" and isinstance(modules.get(name), nn.GRU)]
    try:
        with warnings.catch_warnings(), unrolled(model, unroll):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                buffer,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types
        raise TrialError("export", f"{type(exc).__name__}: {exc}{_hint(exc)}") from exc
    return _materialize_shared_weights(buffer.getvalue())


def _hint(exc: Exception) -> str:
    """What a user can change when the exporter's message names only the operator."""
    if "adaptive_avg_pool2d" in str(exc) and "not factor" in str(exc):
        return (" (an nn.AdaptiveAvgPool2d pools to a fixed size that does not divide the "
                "feature map it gets at this input size, as VGG's 7x7 does on small images: "
                "use larger inputs, or a pooling size that divides the map, e.g. 1)")
    return ""


def _materialize_shared_weights(model: bytes) -> bytes:
    """Give each ``Identity`` of an initializer its own copy of it, as an initializer.

    The exporter stores equal parameters once and feeds the others through an
    ``Identity`` (equal weights happen: layers zeroed by sparsity, untouched
    inits); ONNX Runtime's dynamic quantizer then fails with "Expected
    onnx::Conv_405 to be an initializer", since it only quantizes weights held
    as initializers.
    """
    proto = onnx.load_from_string(model)
    inits = {t.name: t for t in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    aliases = [n for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in inits
               and n.output[0] not in outputs]
    if not aliases:
        return model
    for node in aliases:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        proto.graph.initializer.append(copy)
        proto.graph.node.remove(node)
    return proto.SerializeToString()


def _layer_nodes(model: onnx.ModelProto, node_name: str) -> list[str]:
    """Every node of the layer whose (first) node is ``node_name``, those of its module with
    its op type: one, a stacked LSTM's or GRU's one per layer (``/rnn/LSTM``,
    ``/rnn/LSTM_1``), an unrolled GRU's MatMuls (one per layer and direction for the inputs,
    one per step for the recurrence)."""
    first = next((n for n in model.graph.node if n.name == node_name), None)
    if first is None:
        return [node_name]
    module = _module_of(node_name)
    return [n.name for n in model.graph.node
            if n.op_type == first.op_type and _module_of(n.name) == module]


def unrolled_layers(model: onnx.ModelProto, node_names: Mapping[str, str]) -> dict[str, list[str]]:
    """The layers exported unrolled (:class:`~search.trial.compress.unrolled.UnrolledGRU`),
    each with every node of its module: their first node is a MatMul, and their module holds
    several (a Linear's holds one, even called twice: not with gates) and its gates' Sigmoid
    and Tanh."""
    by_module: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        by_module.setdefault(_module_of(node.name), []).append(node)
    out = {}
    for layer, first in node_names.items():
        nodes = by_module.get(_module_of(first), [])
        ops = [n.op_type for n in nodes]
        if ops.count("MatMul") > 1 and {"Sigmoid", "Tanh"} <= set(ops) and any(
                n.name == first and n.op_type == "MatMul" for n in nodes):
            out[layer] = [n.name for n in nodes]
    return out


def _module_of(node_name: str) -> str:
    """The module name behind a TorchScript-exporter node name.

    Scopes name attributes relatively (``/layer1/conv1/Conv``) but containers'
    children with their parent's name in front (``/stem/stem.0/Conv``,
    ``/layer2/shortcut/shortcut.0/Conv``); both map to dotted module names.
    """
    parts = node_name.strip("/").split("/")[:-1]
    name, previous = "", ""
    for part in parts:
        if previous and part.startswith(previous + "."):
            name += part[len(previous):]
        else:
            name = f"{name}.{part}" if name else part
        previous = part
    return name


def onnx_node_names(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, str]:
    """Map each layer's module name to the name of its ONNX node."""
    wanted = {layer.name: layer.op_type for layer in layers}
    found: dict[str, str] = {}
    for node in model.graph.node:
        module = _module_of(node.name)
        if node.op_type in _NODE_TYPES.get(wanted.get(module, ""), ()):
            if module in found:
                continue  # a stacked LSTM's later layers, an unrolled GRU's later MatMuls
            found[module] = node.name
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise TrialError("export", f"no ONNX node found for layers {missing}")
    return found
