"""Graph costing: an ONNX model read into what each of its operations does.

Each Conv/Gemm/MatMul/LSTM/GRU becomes a ``LayerCost``: its MACs, the elements it reads and
writes, the precision it runs in (read from how its weight is stored: int8 where it is
QDQ int8), the share of zeros in its weight, and the shape facts kernels are sensitive to
(taps falling on padding, depthwise, im2col copies, channels padded to blocks). The other
operations become costs of the elements they move. Turning costs into time is model.py's job.

For a profile that runs on ONNX Runtime's CPU provider, the other operations
are read from the graph ONNX Runtime will execute (its optimizer's output), not
from the exported one: quantize/dequantize pairs fused into QLinearConv cost
nothing, while the transposes, standalone (de)quantizations and softmaxes a
transformer keeps each pay a node overhead. On small models that overhead is
most of the latency (an int8 ``nn.TransformerEncoder`` runs 145 nodes and is
slower than its 115-node fp32 form).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from search.latency.graph import BYTES, ONNX_PRECISION, Graph, fix_batch, probe_shapes
from search.profiles import HardwareProfile

__all__ = [
    "COMPUTE_OPS",
    "LayerCost",
    "costing",
    "costs_for",
    "costs_from_onnx",
]

# the operations that do a model's MACs, each costed from its weight (as exported)
COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "LSTM", "GRU")
_INTEGER_OPS = {"ConvInteger": "Conv", "MatMulInteger": "MatMul",  # dynamic quantization
                "DynamicQuantizeLSTM": "LSTM"}
# ONNX Runtime CPU kernels that do a layer's MACs (costed from the exported graph instead)
_RUNTIME_COMPUTE = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "MatMul", "FusedMatMul",
                    "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                    "DynamicQuantizeMatMul", "MatMulNBits", "Gemm", "FusedGemm", "QGemm",
                    "LSTM", "DynamicQuantizeLSTM", "GRU"}
# views and constants: no kernel time
_RUNTIME_FREE = {"Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Constant"}
_FREE = {"QuantizeLinear", "DequantizeLinear", "Cast", "Reshape", "Flatten", "Squeeze",
         "Unsqueeze", "Identity", "Relu", "Clip", "Shape", "Constant", "Transpose"}


@dataclass(frozen=True)
class LayerCost:
    """What one operation does: MACs and elements moved, in its precision."""

    name: str
    op_type: str
    precision: str
    macs: int = 0
    weight_elems: int = 0
    in_elems: int = 0
    out_elems: int = 0
    density: float = 1.0  # share of non-zero weights
    nm_sparse: bool = False  # weights follow a 2:4 pattern
    input_precision: str | None = None  # when it differs, a conversion pass is paid
    activations_only: bool = False  # a MatMul of two activations (attention), no weight
    runtime_node: bool = False  # a non-compute node of the graph the runtime executes
    moved_bytes: float | None = None  # from each tensor's own type; None: elements x precision
    on_input: float = 1.0  # share of a conv's MACs whose taps fall on the input, not padding
    taps_used: float = 1.0  # share of a conv's weights some output reads off the input
    depthwise: bool = False  # a convolution with one input channel per group
    im2col_copies: int = 0  # output pixels x taps an im2col copies (0: a 1x1 or depthwise conv)
    # a 2-D conv's input channels per group and output channels, where blocking kernels may
    # pad them (0: not such a conv; grouped ones other than depthwise are left unblocked)
    in_channels: int = 0
    out_channels: int = 0



def _nbits_cost(g: Graph, node: onnx.NodeProto, ins: list[str], incoming: str) -> LayerCost:
    """MatMulNBits: 4-bit weight-only, K x N packed in blocks."""
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    k, n = attrs.get("K", 1), attrs.get("N", 1)
    rows = g.elems.get(ins[0], 0) // max(k, 1)
    return LayerCost(name=node.name, op_type="MatMul", precision="int4", macs=int(rows * k * n),
                     weight_elems=k * n, in_elems=g.elems.get(ins[0], 0),
                     out_elems=g.elems.get(node.output[0], 0),
                     input_precision=incoming if incoming != "int4" else None)


def _compute_cost(g: Graph, node: onnx.NodeProto, op_type: str, ins: list[str],
                  incoming: str) -> LayerCost:
    """Conv / Gemm / MatMul: MACs from the weight's shape, precision from its storage."""
    tensor, precision = g.weight_of(ins[1])
    weight = numpy_helper.to_array(tensor) if tensor is not None else None
    w_elems = int(weight.size) if weight is not None else g.elems.get(ins[1], 0)
    out = g.elems.get(node.output[0], 0)
    activations_only = False
    conv = op_type == "Conv" and weight is not None and weight.ndim >= 3
    pixels = out // max(weight.shape[0], 1) if conv else 0  # output positions x batch
    if conv:
        macs = pixels * w_elems
    elif weight is not None and weight.ndim == 2:
        macs = g.elems.get(ins[0], 0) // max(_reduce_dim(node, weight), 1) * weight.size
    elif activations_only := (weight is None and op_type == "MatMul"):  # Q·Kᵀ, A·V
        macs = out * g.last_dim.get(ins[0], 0)
        precision = incoming
    else:
        macs = 0
    density, nm = _sparsity(weight)
    on_input, taps_used, depthwise, copies, group = 1.0, 1.0, False, 0, 1
    if conv:
        on_input, taps_used = _padding_shares(node, g.dims.get(ins[0]), weight.shape[2:])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        depthwise = group > 1 and weight.shape[1] == 1
        taps = int(np.prod(weight.shape[2:]))
        if not depthwise and taps > 1:  # im2col: the input channels once per pixel and tap
            copies = pixels * taps
    channels = (0, 0)  # the channels of a 2-D conv that channel-blocking kernels may pad
    if conv and weight.ndim == 4 and (group == 1 or depthwise):
        channels = (int(weight.shape[1]), int(weight.shape[0]))
    return LayerCost(name=node.name, op_type=op_type, precision=precision, macs=int(macs),
                     weight_elems=w_elems, in_elems=g.elems.get(ins[0], 0), out_elems=out,
                     density=density, nm_sparse=nm, depthwise=depthwise, im2col_copies=copies,
                     in_channels=channels[0], out_channels=channels[1],
                     input_precision=incoming if incoming != precision else None,
                     activations_only=activations_only, on_input=on_input, taps_used=taps_used)


def _recurrent_cost(g: Graph, node: onnx.NodeProto, op_type: str, ins: list[str],
                    incoming: str) -> LayerCost:
    """LSTM / DynamicQuantizeLSTM / GRU: per step and sample, the input weights W (4H x I
    per direction for an LSTM's four gates, 3H x I for a GRU's three) and the recurrent ones
    R (4H or 3H x H) multiply once; R is read again at every step (at batch 1 each step is a
    matrix-vector product, bound by reading R: a 2-layer LSTM of hidden 512 over 32 steps
    ran 13.7 ms fp32 here, 7x its MACs at fp32 peak). The gate count comes with the weights'
    shapes. (A GRU planned int8 is exported unrolled: its MatMuls are costed as MatMuls.)"""
    w, precision = g.weight_of(ins[1])
    r, _ = g.weight_of(ins[2])
    w_elems = g.elems.get(w.name, 0) if w is not None else g.elems.get(ins[1], 0)
    r_elems = g.elems.get(r.name, 0) if r is not None else g.elems.get(ins[2], 0)
    x_dims = g.dims.get(ins[0]) or []
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    steps = x_dims[1 if layout else 0] if len(x_dims) == 3 else 1
    positions = g.elems.get(ins[0], 0) // max(x_dims[-1] if x_dims else 1, 1)  # steps x batch
    out = g.elems.get(node.output[0], 0) if node.output and node.output[0] else 0
    size = BYTES.get(precision, 4.0)
    return LayerCost(name=node.name, op_type=op_type, precision=precision,
                     macs=int(positions * (w_elems + r_elems)), weight_elems=w_elems + r_elems,
                     in_elems=g.elems.get(ins[0], 0), out_elems=out,
                     moved_bytes=(w_elems + steps * r_elems) * size
                     + (g.elems.get(ins[0], 0) + out) * 4.0,
                     input_precision=incoming if incoming not in (precision, "fp32") else None)


def _padding_shares(node: onnx.NodeProto, in_dims: list[int] | None,
                    kernel: tuple[int, ...]) -> tuple[float, float]:
    """Of a convolution's (output position, kernel tap) pairs, the share that reads the input
    rather than its zero padding, and the share of kernel taps any output reads the input
    with. A 3x3 convolution over a 1x1 map (ResNet-18's last stage at 32 px) uses only
    its centre tap: 1/9 of its MACs and weights."""
    if not in_dims or len(in_dims) != len(kernel) + 2:
        return 1.0, 1.0
    attrs = {a.name: list(a.ints) for a in node.attribute if a.type == onnx.AttributeProto.INTS}
    auto = next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
    n = len(kernel)
    strides = attrs.get("strides") or [1] * n
    dilations = attrs.get("dilations") or [1] * n
    pads = attrs.get("pads") or [0] * (2 * n)
    if auto not in (b"NOTSET", b"VALID"):  # SAME_*: padding not written down, assume none skipped
        return 1.0, 1.0
    on, used = 1.0, 1.0
    for d in range(n):
        size, k, s, dil, begin = in_dims[2 + d], kernel[d], strides[d], dilations[d], pads[d]
        out = (size + begin + pads[n + d] - dil * (k - 1) - 1) // s + 1
        if out <= 0 or size <= 0:
            return 1.0, 1.0
        hits = [[0 <= o * s - begin + t * dil < size for t in range(k)] for o in range(out)]
        on *= sum(map(sum, hits)) / (out * k)
        used *= sum(any(h[t] for h in hits) for t in range(k)) / k
    return on, used


def _output_precision(g: Graph, node: onnx.NodeProto, incoming: str) -> str:
    """What a non-compute node hands on: QuantizeLinear its zero point's type, Cast its target;
    DequantizeLinear and elementwise ops keep the precision they got."""
    if node.op_type == "QuantizeLinear":
        zp = g.inits.get(node.input[2]) if len(node.input) > 2 else None
        return ONNX_PRECISION.get(zp.data_type, "int8") if zp is not None else "int8"
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), onnx.TensorProto.FLOAT)
        return ONNX_PRECISION.get(to, "fp32")
    return incoming


def costs_from_onnx(model: bytes | onnx.ModelProto, batch: int = 1, *,
                    runtime_graph: bool = False) -> list[LayerCost]:
    """Layer costs of an ONNX model as it will run (int8 where weights are QDQ int8).

    With ``runtime_graph``, the non-compute costs are the nodes ONNX Runtime's CPU
    provider executes after its graph optimizations (``runtime_node``), and precision
    boundaries are those nodes rather than a conversion pass per layer.
    """
    exported = onnx.load_from_string(model) if isinstance(model, bytes) else model
    proto = shape_inference.infer_shapes(fix_batch(exported, batch), data_prop=True)
    g = Graph(proto)
    missing = [o for node in proto.graph.node for o in node.output if o and o not in g.elems]
    if missing:  # run at batch 1 (a GPU profile's batch 128 of a large model would not fit)
        proto = probe_shapes(proto, missing, fix_batch(exported, 1) if batch > 1 else None,
                              batch)
        g = Graph(proto)
    costs = _graph_costs(proto, g)
    if not runtime_graph:
        return costs
    try:
        nodes, dequantized = _runtime_nodes(proto, g)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors have no common base
        logging.getLogger(__name__).warning(
            "latency model: ONNX Runtime could not open the model to read the graph it "
            "executes (%s); costing the exported graph instead", str(exc).splitlines()[0])
        return costs
    # a weight ONNX Runtime dequantizes on every run (its DequantizeLinear was not fused into
    # an integer kernel, as before an fp32 layer) feeds a float kernel: the layer runs fp32
    weights = {node.name: tensor.name for node in proto.graph.node
               if _INTEGER_OPS.get(node.op_type, node.op_type) in COMPUTE_OPS and len(node.input) > 1
               and (tensor := g.weight_of(node.input[1])[0]) is not None}
    compute = [replace(c, input_precision=None,
                       precision="fp32" if weights.get(c.name) in dequantized else c.precision)
               for c in costs if c.op_type in COMPUTE_OPS]
    return compute + nodes


def _runtime_nodes(proto: onnx.ModelProto, g: Graph) -> tuple[list[LayerCost], set[str]]:
    """The non-compute nodes of the graph ONNX Runtime's CPU provider runs (its optimizer's
    output at the default level), sized from the exported graph's shapes and types by tensor
    name, and the weights it dequantizes on every run. Tensors the optimizer named anew (the
    int8 convolutions' NHWC outputs that feed QLinearAdd) are sized by one run of that
    graph: unsized, each residual add of an int8 CNN cost its node overhead alone."""
    import tempfile
    from pathlib import Path

    from search._base.ort import make_session  # the sessions scoring and measuring open

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "runtime.onnx")
        make_session(proto.SerializeToString(), threads=1, optimized_path=path)
        runtime = onnx.load(path, load_external_data=False)
    kept = [n for n in runtime.graph.node
            if n.op_type not in _RUNTIME_COMPUTE and n.op_type not in _RUNTIME_FREE]
    missing = sorted({t for n in kept for t in [*n.input, *n.output]
                      if t and t not in g.elems and t not in g.inits})
    elems, size = g.elems, g.size
    if missing:
        sized = Graph(probe_shapes(runtime, missing))
        elems, size = {**sized.elems, **g.elems}, {**sized.size, **g.size}
    nodes, dequantized = [], set()
    for node in kept:
        int8 = node.op_type.startswith("QLinear") or node.op_type == "DequantizeLinear" or \
            (bool(node.input) and size.get(node.input[0]) == 1.0)  # an NhwcMaxPool on uint8
        if node.op_type == "DequantizeLinear" and node.input[0] in g.inits:
            dequantized.add(node.input[0])
        ins, outs = [i for i in node.input if i], list(node.output)
        nodes.append(LayerCost(
            name=node.name, op_type=node.op_type, precision="int8" if int8 else "fp32",
            in_elems=sum(elems.get(i, 0) for i in ins if i not in g.inits),
            out_elems=sum(elems.get(o, 0) for o in outs), runtime_node=True,
            moved_bytes=sum(elems.get(t, 0) * size.get(t, 4.0) for t in ins + outs)))
    return nodes, dequantized


def _graph_costs(proto: onnx.ModelProto, g: Graph) -> list[LayerCost]:
    tensor_precision = {v.name: ONNX_PRECISION.get(v.type.tensor_type.elem_type, "fp32")
                        for v in proto.graph.input}
    costs: list[LayerCost] = []
    for node in proto.graph.node:
        ins = [i for i in node.input if i]
        incoming = tensor_precision.get(ins[0], "fp32") if ins else "fp32"
        op_type = _INTEGER_OPS.get(node.op_type, node.op_type)
        if node.op_type == "MatMulNBits":
            costs.append(_nbits_cost(g, node, ins, incoming))
            precision = "fp32"
        elif op_type in ("LSTM", "GRU") and len(ins) >= 3:
            costs.append(_recurrent_cost(g, node, op_type, ins, incoming))
            precision = "fp32"  # its outputs are float either way
        elif op_type in COMPUTE_OPS and len(ins) >= 2:
            costs.append(_compute_cost(g, node, op_type, ins, incoming))
            precision = costs[-1].precision
        else:
            precision = _output_precision(g, node, incoming)
            if node.op_type not in _FREE:
                costs.append(LayerCost(
                    name=node.name, op_type=node.op_type, precision=precision,
                    in_elems=sum(g.elems.get(i, 0) for i in ins if i not in g.inits),
                    out_elems=sum(g.elems.get(o, 0) for o in node.output)))
        for o in node.output:
            tensor_precision[o] = precision
    return costs


def _reduce_dim(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The K of a Gemm/MatMul from its weight (respecting Gemm's transB)."""
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    if node.op_type == "Gemm" and trans_b:
        return int(weight.shape[1])
    return int(weight.shape[0])


def _sparsity(weight: np.ndarray | None) -> tuple[float, bool]:
    if weight is None or weight.size == 0:
        return 1.0, False
    nonzero = weight != 0
    density = float(nonzero.mean())
    flat = nonzero.reshape(weight.shape[0], -1)
    nm = False
    if flat.shape[1] % 4 == 0:
        nm = bool((flat.reshape(flat.shape[0], -1, 4).sum(-1) <= 2).all())
    return density, nm


# bumped when layer costs change for the same model: evidence and fits read the old way are
# set aside (2: shapes a run tells, kernel rates per op type, depthwise and im2col terms;
# 3: conv channels, for kernels that pad them to blocks)
_COSTING_VERSION = 3


def costing(profile: HardwareProfile) -> str:
    """How ``profile``'s layer costs are read: ``executed`` (the graph ONNX Runtime's CPU
    provider runs, present in every install) or ``exported``, and by which version of this
    module. Evidence and fits of another kind are not mixed with these (calibration.py)."""
    kind = "executed" if profile.measure.execution_provider == "CPUExecutionProvider" \
        else "exported"
    return f"{kind}-v{_COSTING_VERSION}"


def costs_for(model: bytes, profile: HardwareProfile) -> list[LayerCost]:
    """Layer costs as ``profile``'s runtime sees them, at its batch size (``costing``)."""
    return costs_from_onnx(model, profile.measure.batch_size,
                           runtime_graph=costing(profile).startswith("executed"))
