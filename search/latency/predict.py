"""Predicted latency: a roofline over the model's layers, with per-op overheads.

Each Conv/Gemm/MatMul costs ``max(compute time, memory time) + op overhead`` at
the precision it runs in, using the profile's peak throughput, its efficiency
(calibration) factor and memory bandwidth; compute slows where a layer has too
few output rows to fill the device's matrix tiles (``fill_rows``). A layer
whose input arrives in another precision pays a conversion pass (fp32 islands cost, DESIGN.md §3).
Unstructured zeros only shrink compute where the profile has sparse kernels;
structured pruning shrinks the layers themselves, so it is seen directly.

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
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from search._base.errors import ConfigError
from search._base.records import LatencyStats
from search.profiles import HardwareProfile, LatencyModelSettings

__all__ = [
    "Calibration",
    "LayerCost",
    "costing",
    "costs_for",
    "costs_from_onnx",
    "costs_from_torch",
    "fit_calibration",
    "predict_latency",
    "predict_ms",
]

BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int16": 2.0, "int8": 1.0, "int4": 0.5}
_COMPUTE = ("Conv", "Gemm", "MatMul", "LSTM")
_INTEGER_OPS = {"ConvInteger": "Conv", "MatMulInteger": "MatMul",  # dynamic quantization
                "DynamicQuantizeLSTM": "LSTM"}
# ONNX Runtime CPU kernels that do a layer's MACs (costed from the exported graph instead)
_RUNTIME_COMPUTE = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "MatMul", "FusedMatMul",
                    "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                    "DynamicQuantizeMatMul", "MatMulNBits", "Gemm", "FusedGemm", "QGemm",
                    "LSTM", "DynamicQuantizeLSTM"}
# runtime ops whose table rate is for int8 data already; the others (a transpose, a pool on
# uint8 data) were timed on fp32 tensors and move a quarter of the bytes on int8 ones (an
# NCHW->NHWC transpose of uint8: 0.056 ns an element, of fp32 0.24)
_INT8_KERNELS = ("QLinear", "QuantizeLinear", "DequantizeLinear", "DynamicQuantize", "QGemm")
# views and constants: no kernel time
_RUNTIME_FREE = {"Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Constant"}
_FREE = {"QuantizeLinear", "DequantizeLinear", "Cast", "Reshape", "Flatten", "Squeeze",
         "Unsqueeze", "Identity", "Relu", "Clip", "Shape", "Constant", "Transpose"}
_ONNX_PRECISION = {
    onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16", onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "int8", onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.UINT16: "int16", onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "int4",
}


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


@dataclass(frozen=True)
class Calibration:
    """Multipliers on a profile's latency model, refit from measurements."""

    efficiency: dict[str, float]
    op_overhead_us: float
    session_overhead_us: float
    fitted_on: int = 0
    memory_efficiency: dict[str, float] = field(default_factory=dict)  # default 1.0
    overhead_scale: dict[str, float] = field(default_factory=dict)  # per precision, default 1.0
    fill_rows: dict[str, float] = field(default_factory=dict)  # per precision, default 0
    node_overhead_us: float | None = None  # per runtime node; None: a quarter op overhead
    dram_gbps: float | None = None  # with cache_mb: the rate for weights beyond the cache
    cache_mb: float | None = None
    node_scale: float | None = None  # on the profile's node_ns_per_element (None: it has none)

    @staticmethod
    def of(settings: LatencyModelSettings) -> Calibration:
        eff = {p: settings.efficiency.get(p, 0.5) for p in settings.peak_tops}
        mem = {p: settings.memory_efficiency.get(p, 1.0) for p in settings.peak_tops}
        return Calibration(eff, settings.op_overhead_us, settings.session_overhead_us,
                           memory_efficiency=mem, fill_rows=dict(settings.fill_rows),
                           node_overhead_us=settings.node_overhead_us,
                           dram_gbps=settings.dram_gbps, cache_mb=settings.cache_mb,
                           node_scale=1.0 if settings.node_ns_per_element else None)

    def bandwidth_gbps(self, settings: LatencyModelSettings, working_mb: float) -> float:
        """Memory rate for data of which ``working_mb`` are touched between two reads of it:
        the profile's rate where that fits the cache, falling towards DRAM's as it outgrows
        it. Weights are read once per run, so for them it is the whole model's weights
        (VGG-11's 67 MB fp32 4096x4096 Linear ran at 16 GB/s, 2.4 MB int8 layers of a
        ResNet-18 at 23 GB/s on the 2-core Xeon's profiled nodes); an activation is read
        right after it is written, so for it, its own size."""
        if self.cache_mb is None or self.dram_gbps is None:
            return settings.memory_gbps
        return self.dram_gbps + (settings.memory_gbps - self.dram_gbps) / (
            1.0 + working_mb / self.cache_mb)

    def node_us(self) -> float:
        return 0.25 * self.op_overhead_us if self.node_overhead_us is None \
            else self.node_overhead_us


def _type_bytes(elem_type: int) -> float:
    return BYTES.get(_ONNX_PRECISION.get(elem_type, "fp32"), 4.0)


def _shape_elems(shape: onnx.TensorShapeProto) -> int | None:
    total = 1
    for dim in shape.dim:
        if not dim.HasField("dim_value"):
            return None
        total *= dim.dim_value
    return total


def _fix_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """``model`` with its batch axis set to ``batch``, in the value infos too: a model
    converted to fp16 keeps the exporter's symbolic shapes there, and shape inference does
    not overwrite them, so every layer behind one would be costed as empty."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    symbols = {v.type.tensor_type.shape.dim[0].dim_param for v in graph.input
               if v.type.tensor_type.shape.dim} - {""}
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    for value in graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in symbols:
                dim.dim_value = batch
    return model


class _Graph:
    """An ONNX graph with inferred shapes: element counts, initializers, producers."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        graph = proto.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.elems: dict[str, int] = {}
        self.size: dict[str, float] = {}  # bytes per element, from the tensor's type
        self.last_dim: dict[str, int] = {}  # the reduced dimension of an activation MatMul
        self.dims: dict[str, list[int]] = {}
        for value in list(graph.value_info) + list(graph.input) + list(graph.output):
            self.size[value.name] = _type_bytes(value.type.tensor_type.elem_type)
            n = _shape_elems(value.type.tensor_type.shape)
            if n is not None:
                self.elems[value.name] = n
                self.dims[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
                dims = value.type.tensor_type.shape.dim
                if dims and dims[-1].HasField("dim_value"):
                    self.last_dim[value.name] = dims[-1].dim_value
        for name, tensor in self.inits.items():
            self.elems[name] = int(np.prod(tensor.dims)) if tensor.dims else 1
            self.size[name] = _type_bytes(tensor.data_type)
        self.producers = {out: node for node in graph.node for out in node.output}

    def weight_of(self, name: str) -> tuple[onnx.TensorProto | None, str]:
        """The initializer behind ``name`` (through DequantizeLinear/Cast) and its precision."""
        node = self.producers.get(name)
        seen = 0
        while node is not None and node.op_type in ("DequantizeLinear", "Cast") and seen < 4:
            if node.op_type == "DequantizeLinear" and node.input[0] in self.inits:
                t = self.inits[node.input[0]]
                return t, _ONNX_PRECISION.get(t.data_type, "fp32")
            name, node, seen = node.input[0], self.producers.get(node.input[0]), seen + 1
        t = self.inits.get(name)
        return t, _ONNX_PRECISION.get(t.data_type, "fp32") if t is not None else "fp32"


def _nbits_cost(g: _Graph, node: onnx.NodeProto, ins: list[str], incoming: str) -> LayerCost:
    """MatMulNBits: 4-bit weight-only, K x N packed in blocks."""
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    k, n = attrs.get("K", 1), attrs.get("N", 1)
    rows = g.elems.get(ins[0], 0) // max(k, 1)
    return LayerCost(name=node.name, op_type="MatMul", precision="int4", macs=int(rows * k * n),
                     weight_elems=k * n, in_elems=g.elems.get(ins[0], 0),
                     out_elems=g.elems.get(node.output[0], 0),
                     input_precision=incoming if incoming != "int4" else None)


def _compute_cost(g: _Graph, node: onnx.NodeProto, op_type: str, ins: list[str],
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


def _recurrent_cost(g: _Graph, node: onnx.NodeProto, ins: list[str],
                    incoming: str) -> LayerCost:
    """LSTM / DynamicQuantizeLSTM: per step and sample, the input weights W (4H x I per
    direction) and the recurrent ones R (4H x H) multiply once; R is read again at every
    step (at batch 1 each step is a matrix-vector product, bound by reading R: a 2-layer
    LSTM of hidden 512 over 32 steps ran 13.7 ms fp32 here, 7x its MACs at fp32 peak)."""
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
    return LayerCost(name=node.name, op_type="LSTM", precision=precision,
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


def _output_precision(g: _Graph, node: onnx.NodeProto, incoming: str) -> str:
    """What a non-compute node hands on: QuantizeLinear its zero point's type, Cast its target;
    DequantizeLinear and elementwise ops keep the precision they got."""
    if node.op_type == "QuantizeLinear":
        zp = g.inits.get(node.input[2]) if len(node.input) > 2 else None
        return _ONNX_PRECISION.get(zp.data_type, "int8") if zp is not None else "int8"
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), onnx.TensorProto.FLOAT)
        return _ONNX_PRECISION.get(to, "fp32")
    return incoming


def costs_from_onnx(model: bytes | onnx.ModelProto, batch: int = 1, *,
                    runtime_graph: bool = False) -> list[LayerCost]:
    """Layer costs of an ONNX model as it will run (int8 where weights are QDQ int8).

    With ``runtime_graph``, the non-compute costs are the nodes ONNX Runtime's CPU
    provider executes after its graph optimizations (``runtime_node``), and precision
    boundaries are those nodes rather than a conversion pass per layer.
    """
    exported = onnx.load_from_string(model) if isinstance(model, bytes) else model
    proto = shape_inference.infer_shapes(_fix_batch(exported, batch), data_prop=True)
    g = _Graph(proto)
    missing = [o for node in proto.graph.node for o in node.output if o and o not in g.elems]
    if missing:  # run at batch 1 (a GPU profile's batch 128 of a large model would not fit)
        proto = _probe_shapes(proto, missing, _fix_batch(exported, 1) if batch > 1 else None,
                              batch)
        g = _Graph(proto)
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
               if _INTEGER_OPS.get(node.op_type, node.op_type) in _COMPUTE and len(node.input) > 1
               and (tensor := g.weight_of(node.input[1])[0]) is not None}
    compute = [replace(c, input_precision=None,
                       precision="fp32" if weights.get(c.name) in dequantized else c.precision)
               for c in costs if c.op_type in _COMPUTE]
    return compute + nodes


_PROBE_INPUT_ELEMS = 1 << 22  # no probe run on inputs larger than this (16 MB of fp32)


def _probe_shapes(proto: onnx.ModelProto, missing: list[str], run: onnx.ModelProto | None = None,
                  batch: int = 1) -> onnx.ModelProto:
    """``proto`` with the shapes of ``missing`` tensors read off one run on zeros.

    ONNX shape inference cannot follow every shape an exporter computes at run time
    (``nn.MultiheadAttention``'s head split reshapes to a shape built from Shape, Sqrt and
    Concat nodes): behind such a node every tensor was shapeless and its MatMuls costed at 0
    MACs. A run at the model's fixed input shapes tells them exactly. ``run``, when given, is
    the same model at batch 1, whose shapes are scaled to ``batch`` on their first axis (the
    elements an activation has grow with the batch whichever axis holds it). Left as it was
    when the inputs' shapes are not all known, are too large, or the run fails.
    """
    import onnxruntime as ort

    run = run or proto
    inits = {t.name for t in run.graph.initializer}
    feeds = {}
    for value in run.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
        if not all(dims):
            return proto
        feeds[value.name] = np.zeros(dims, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    if sum(a.size for a in feeds.values()) > _PROBE_INPUT_ELEMS:
        return proto
    probe = onnx.ModelProto.FromString(run.SerializeToString())
    outputs = {v.name for v in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in missing if n not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        arrays = session.run(None, feeds)
    except Exception:  # noqa: BLE001 - ONNX Runtime's errors have no common base
        return proto
    wanted = set(missing)
    kept = [v for v in proto.graph.value_info if v.name not in wanted]  # no name twice
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    for out, array in zip(session.get_outputs(), arrays, strict=True):
        if out.name in wanted and isinstance(array, np.ndarray):
            dims = list(array.shape)
            if dims and batch > 1 and run is not proto:
                dims[0] *= batch
            proto.graph.value_info.append(onnx.helper.make_tensor_value_info(
                out.name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims))
    return proto


def _runtime_nodes(proto: onnx.ModelProto, g: _Graph) -> tuple[list[LayerCost], set[str]]:
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
        sized = _Graph(_probe_shapes(runtime, missing))
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


def _graph_costs(proto: onnx.ModelProto, g: _Graph) -> list[LayerCost]:
    tensor_precision = {v.name: _ONNX_PRECISION.get(v.type.tensor_type.elem_type, "fp32")
                        for v in proto.graph.input}
    costs: list[LayerCost] = []
    for node in proto.graph.node:
        ins = [i for i in node.input if i]
        incoming = tensor_precision.get(ins[0], "fp32") if ins else "fp32"
        op_type = _INTEGER_OPS.get(node.op_type, node.op_type)
        if node.op_type == "MatMulNBits":
            costs.append(_nbits_cost(g, node, ins, incoming))
            precision = "fp32"
        elif op_type == "LSTM" and len(ins) >= 3:
            costs.append(_recurrent_cost(g, node, ins, incoming))
            precision = "fp32"  # its outputs are float either way
        elif op_type in _COMPUTE and len(ins) >= 2:
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


def costs_from_torch(model, input_shape: tuple[int, ...], batch: int,  # noqa: ANN001
                     precision: str = "fp32", device: str = "cpu") -> list[LayerCost]:
    """Layer costs of a PyTorch model's Conv/Linear layers, without exporting it.

    ``device="meta"`` sizes a large model without allocating or computing anything.
    """
    import torch

    from search.trial.compress._layers import CONV, WEIGHTED

    costs: list[LayerCost] = []

    def hook(module, inputs, output):  # noqa: ANN001, ANN202
        x = inputs[0]
        w = module.weight
        if isinstance(module, CONV):
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
        if isinstance(module, WEIGHTED):
            module._cost_name = name
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return costs


def _channel_padding(c: LayerCost, block: int) -> float:
    """How much more work a conv does when its kernel pads channels to blocks of ``block``.

    Measured with ONNX Runtime's fp32 NCHWc kernels (1 thread, AVX-512, blocks of 16): 3x3
    convolutions 48->40, 40->48 and 48->48 channels at 16x16 all ran 48.4-48.8 us, 40-channel
    depthwise and 1x1 layers as long as 48-channel ones; a first convolution with fewer input
    channels than a block (1, 3 or 8) reads them unpadded."""
    if block <= 1 or not c.out_channels:
        return 1.0
    padded = math.ceil(c.out_channels / block) * block / c.out_channels
    if not c.depthwise and c.in_channels >= block:
        padded *= math.ceil(c.in_channels / block) * block / c.in_channels
    return padded


def predict_ms(costs: Iterable[LayerCost], profile: HardwareProfile,
               calibration: Calibration | None = None) -> float:
    """Predicted latency in milliseconds of the whole model on ``profile``."""
    settings = profile.latency_model
    if settings is None:
        raise ConfigError(f"profile {profile.name!r} has no latency_model, so latency cannot "
                          "be predicted for it; add one (see hardware_profiles/t4-gpu.yaml)")
    cal = calibration or Calibration.of(settings)
    costs = list(costs)
    weight_mb = sum(c.weight_elems * BYTES.get(c.precision, 4.0) for c in costs
                    if c.op_type in _COMPUTE) / 1e6
    weight_rate = cal.bandwidth_gbps(settings, weight_mb) * 1e9
    bandwidth = settings.memory_gbps * 1e9

    def seconds(nbytes: float, rate: float | None = None) -> float:  # activations: own size
        return nbytes / (rate or cal.bandwidth_gbps(settings, nbytes / 1e6) * 1e9)

    total_us = cal.session_overhead_us
    for c in costs:
        b = BYTES.get(c.precision, 4.0)
        skip = c.op_type == "Conv" and c.precision in settings.skips_padding
        if c.moved_bytes is not None:
            memory_s = seconds(c.moved_bytes)
        else:
            memory_s = seconds(c.weight_elems * (c.taps_used if skip else 1.0) * b, weight_rate) \
                + seconds((c.in_elems + c.out_elems) * b)
        memory_s /= cal.memory_efficiency.get(c.precision, 1.0)
        if c.op_type in _COMPUTE:
            precision = c.precision
            if c.activations_only and precision not in settings.peak_tops:
                precision = next(iter(settings.peak_tops))  # runs in what the device has
            peak = settings.peak_tops.get(precision)
            if peak is None:
                raise ConfigError(f"profile {profile.name!r} cannot run {c.precision} "
                                  f"({c.op_type} {c.name}); it runs {sorted(settings.peak_tops)}")
            work = 2.0 * c.macs * (c.on_input if skip else 1.0) * _channel_padding(
                c, settings.channel_block.get(c.precision, 0))
            if profile.sparse_kernels == "unstructured":
                work *= c.density
            elif profile.sparse_kernels == "2:4" and c.nm_sparse:
                work *= 0.5
            efficiency = cal.efficiency.get(precision, 0.5)
            if c.depthwise:
                efficiency = settings.depthwise_efficiency.get(precision, efficiency)
            compute_s = work / (peak * 1e12 * efficiency)
            fill = cal.fill_rows.get(precision, 0.0)
            if fill and c.macs and c.weight_elems:  # rows = MACs per weight: batch x pixels
                compute_s *= 1.0 + fill * c.weight_elems / c.macs
            overhead = cal.op_overhead_us * cal.overhead_scale.get(c.precision, 1.0)
            overhead += c.im2col_copies * settings.im2col_ns_per_copy.get(c.precision, 0.0) * 1e-3
            total_us += max(compute_s, memory_s) * 1e6 + overhead
            if c.input_precision is not None:  # a conversion pass at a precision boundary
                conv_bytes = c.in_elems * (b + BYTES.get(c.input_precision, 4.0))
                total_us += conv_bytes / bandwidth * 1e6 + cal.op_overhead_us
        elif c.runtime_node:
            if cal.node_scale is not None:  # what its kernel spends per element
                rates = settings.node_ns_per_element
                rate = rates.get(c.op_type, rates.get("default", 0.0))
                if c.precision == "int8" and not c.op_type.startswith(_INT8_KERNELS):
                    rate /= 4.0  # a byte moved where the table's fp32 op moved four
                memory_s = max(memory_s, max(c.in_elems, c.out_elems) * rate * cal.node_scale
                               * 1e-9)
            total_us += memory_s * 1e6 + cal.node_us()
        else:
            total_us += memory_s * 1e6 + 0.25 * cal.op_overhead_us * cal.overhead_scale.get(
                c.precision, 1.0)
    return total_us / 1e3


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


def predict_latency(model: bytes, profile: HardwareProfile, input_shape: tuple[int, ...],
                    calibration: Calibration | None = None) -> LatencyStats:
    """A LatencyStats labelled ``predicted`` for the profile's device and batch size."""
    ms = predict_ms(costs_for(model, profile), profile, calibration)
    return LatencyStats(median_ms=ms, p90_ms=ms, mean_ms=ms, cv=0.0, runs=0, source="predicted",
                        device=f"{profile.name} (latency model)", provider="",
                        batch_size=profile.measure.batch_size)


# Weight of the pull towards the starting calibration, per parameter, in log units against
# the log error of one measurement. Seven free parameters fitted on a few architectures
# explain each other's errors away (an int8 transformer's extra nodes became a dear int8
# kernel call, then every int8 CNN was predicted slower than fp32): on 40 measured variants
# of four architectures (experiments/validate_latency_model.py, 2-core Xeon with VNNI),
# 0.3 took leave-one-architecture-out from Spearman 0.665 / median error 41 % / worst 281 %
# to 0.732 / 26 % / 192 %, leave-one-variant-out unchanged (0.904 -> 0.913, median 20 %)
FIT_PRIOR = 0.3
# A fit for one architecture only ever predicts that architecture's variants, so it may move
# further from the profile's compromise across architectures. Leave-one-variant-out within
# each of six architectures (60 variants measured twice, hours apart, on that Xeon): 51 / 60
# within 15 % at 0.3 on both tables, 54 and 55 at 0.1, 54 and 52 at 0; fitted on 4 or 6
# random variants and predicting the rest, 0.1 was as good or better (73-82 % within 15 %
# against 69-78 %)
ARCHITECTURE_PRIOR = 0.1


def fit_calibration(samples: Iterable[tuple[list[LayerCost], float]], profile: HardwareProfile,
                    base: Calibration | None = None, prior: float = FIT_PRIOR,
                    weights: Iterable[float] | None = None) -> Calibration:
    """Refit efficiencies and overheads so predictions match measured latencies (ms).

    Least squares on log latency, so fast and slow models weigh alike, each
    parameter pulled towards ``base`` (the profile's numbers) with weight
    ``prior``: the fewer the measurements, the less they move it. ``weights``
    count a sample as that many (default one each).
    """
    samples = list(samples)
    weights = [1.0] * len(samples) if weights is None else list(weights)
    kept = [(c, ms, w) for (c, ms), w in zip(samples, weights, strict=True) if ms > 0]
    data = [(c, ms) for c, ms, _ in kept]
    root_w = [math.sqrt(w) for _, _, w in kept]
    settings = profile.latency_model
    if settings is None or len(data) < 3:
        return base or Calibration.of(settings) if settings else base  # type: ignore[return-value]
    start = base or Calibration.of(settings)
    used = sorted({c.precision for costs, _ in data for c in costs if c.op_type in _COMPUTE})
    keys = [p for p in used if p in start.efficiency]
    keys = (["fp32"] if "fp32" in keys else []) + [p for p in keys if p != "fp32"]
    nodes = any(c.runtime_node for costs, _ in data for c in costs)
    return _least_squares(start, keys, lambda cal: [
        w * math.log(predict_ms(costs, profile, cal) / ms)
        for (costs, ms), w in zip(data, root_w, strict=True)], len(data),
                          node_overhead=nodes, cache=start.cache_mb is not None, prior=prior)


def _least_squares(start: Calibration, eff_keys: list[str],
                   residuals: Callable[[Calibration], list[float]], n: int, *,
                   per_precision_overheads: bool = True, memory: bool = True,
                   fill_keys: list[str] | None = None,
                   node_overhead: bool = False, cache: bool = False,
                   prior: float = 0.0) -> Calibration:
    """Fit compute and memory efficiency per precision, overheads.

    Parameters: efficiency of each precision in ``eff_keys``; with ``memory``, a
    memory efficiency of each (caches make small models read weights faster than
    DRAM; ONNX Runtime's int8 QLinearConv on a layer of few output pixels took
    ~130 us for 2.4 M weights against ~78 us for fp32, in per-node profiles of
    ResNet-18 on the 2-core Xeon); the op overhead and, for precisions other than the
    first, a multiplier on it (int8 kernels cost more per call on a CPU); the
    session overhead; with ``fill_keys``, the fill rows of those precisions
    (fitted where tables span batch sizes, kept from the profile otherwise); with
    ``node_overhead``, the overhead of a runtime node (samples costed from the executed
    graph); with ``cache``, the DRAM rate (``Calibration.bandwidth_gbps``; the cache's size is
    the device's, from the profile: fitted too, it traded against the memory efficiencies and
    put every activation of an unseen MobileNet in DRAM, 2.4-3.7x too slow).
    All in log space, bounded; ``prior`` > 0 adds ``prior x (log parameter - log
    start)`` per parameter to the residuals.
    """
    from scipy.optimize import least_squares

    k = len(eff_keys)
    m = k if memory else 0
    scaled_keys = eff_keys[1:] if per_precision_overheads else []
    fill_keys = fill_keys or []
    f0 = k + m + len(scaled_keys)
    n0 = f0 + len(fill_keys)  # where the node overhead sits, when fitted
    rate = node_overhead and start.node_scale is not None  # the nodes' per-element cost
    c0 = n0 + (1 if node_overhead else 0) + (1 if rate else 0)  # the DRAM rate, when fitted

    def unpack(theta: np.ndarray) -> Calibration:
        eff = dict(start.efficiency)
        eff.update({p: float(np.exp(v)) for p, v in zip(eff_keys, theta[:k], strict=True)})
        mem = dict(start.memory_efficiency)
        mem.update({p: float(np.exp(v)) for p, v in zip(eff_keys[:m], theta[k:k + m], strict=True)})
        scale = {p: float(np.exp(v)) for p, v in
                 zip(scaled_keys, theta[k + m:k + m + len(scaled_keys)], strict=True)}
        fill = dict(start.fill_rows)
        fill.update({p: float(np.exp(v)) for p, v in
                     zip(fill_keys, theta[f0:f0 + len(fill_keys)], strict=True)})
        node = float(np.exp(theta[n0])) if node_overhead else start.node_overhead_us
        node_rate = float(np.exp(theta[n0 + 1])) if rate else start.node_scale
        dram = float(np.exp(theta[c0])) if cache else start.dram_gbps
        return Calibration(eff, float(np.exp(theta[-2])), float(np.exp(theta[-1])), n, mem, scale,
                           fill, node, dram, start.cache_mb, node_rate)

    theta0 = np.log([start.efficiency[p] for p in eff_keys]
                    + [start.memory_efficiency.get(p, 1.0) for p in eff_keys[:m]]
                    + [start.overhead_scale.get(p, 1.0) for p in scaled_keys]
                    + [max(start.fill_rows.get(p, 1.0), 1e-2) for p in fill_keys]
                    + ([max(start.node_us(), 1e-2)] if node_overhead else [])
                    + ([start.node_scale] if rate else [])
                    + ([start.dram_gbps] if cache else [])
                    + [max(start.op_overhead_us, 1e-2), max(start.session_overhead_us, 1e-2)])
    mem_bounds = (0.1, 20.0)
    # efficiency may pass 1: a profile's peak is nominal for a class of device, and a 2-core
    # Zen 5 ran the digits ResNet's fp32 model at 0.25 TFLOPS against cpu-avx512-vnni's 0.19
    # (capped at 1, its per-architecture fits missed the unpruned variants by 15-25 %)
    max_efficiency = 5.0
    nodes = 1 if node_overhead else 0
    rates = 1 if rate else 0
    drams = 1 if cache else 0  # GB/s
    bounds = (np.log([1e-4] * k + [mem_bounds[0]] * m + [0.2] * len(scaled_keys)
                     + [1e-2] * len(fill_keys) + [1e-2] * nodes + [0.05] * rates + [1e-2] * drams
                     + [1e-2, 1e-2]),
              np.log([max_efficiency] * k + [mem_bounds[1]] * m + [20.0] * len(scaled_keys)
                     + [1e5] * len(fill_keys) + [1e4] * nodes + [20.0] * rates + [1e4] * drams
                     + [1e5, 1e5]))
    theta0 = np.clip(theta0, bounds[0] + 1e-9, bounds[1] - 1e-9)
    anchor = theta0.copy()

    def objective(theta: np.ndarray) -> np.ndarray:
        data = np.asarray(residuals(unpack(theta)))
        return np.concatenate([data, prior * (theta - anchor)]) if prior else data

    fit = least_squares(objective, theta0, bounds=bounds)
    return unpack(fit.x)
