"""Reading an ONNX graph's tensors: their shapes, element counts, sizes and precisions.

Shapes come from ONNX shape inference at a fixed batch size, and where inference cannot
follow a shape the exporter computes at run time, from one run of the model on zeros. What
each operation costs is built on these (costing.py).
"""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["BYTES", "ONNX_PRECISION", "Graph", "fix_batch", "probe_shapes"]

BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int16": 2.0, "int8": 1.0, "int4": 0.5}
ONNX_PRECISION = {
    onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16", onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "int8", onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.UINT16: "int16", onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "int4",
}


def _type_bytes(elem_type: int) -> float:
    return BYTES.get(ONNX_PRECISION.get(elem_type, "fp32"), 4.0)


def _shape_elems(shape: onnx.TensorShapeProto) -> int | None:
    total = 1
    for dim in shape.dim:
        if not dim.HasField("dim_value"):
            return None
        total *= dim.dim_value
    return total


def fix_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
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


class Graph:
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
                return t, ONNX_PRECISION.get(t.data_type, "fp32")
            name, node, seen = node.input[0], self.producers.get(node.input[0]), seen + 1
        t = self.inits.get(name)
        return t, ONNX_PRECISION.get(t.data_type, "fp32") if t is not None else "fp32"


_PROBE_INPUT_ELEMS = 1 << 22  # no probe run on inputs larger than this (16 MB of fp32)


def probe_shapes(proto: onnx.ModelProto, missing: list[str], run: onnx.ModelProto | None = None,
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
