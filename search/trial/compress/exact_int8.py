"""Score an int8 model as an int8 device computes it, on a CPU whose kernels saturate.

ONNX Runtime runs uint8 activations times int8 weights (U8S8) on x86 CPUs without a VNNI
instruction with ``vpmaddubsw``, which adds pairs of products in 16 bits and saturates: the
documented reason for ``reduce_range``. A model quantized for a VNNI device (8-bit weights,
no reduce_range) and scored on such a CPU loses accuracy the device never loses (the
bundled FCOS detector: 84.36 val mAP computed exactly, 83.59 through saturating kernels;
fp32 84.77; symmetric int8 activations, S8S8: 76.60, and 84.21 computed exactly). The
scoring twin stores every int8 value of the quantization (weights, zero points) as uint8
plus 128: the same real values, run by the U8U8 kernels, which do not saturate. Only
scoring uses it; the shipped and measured model keeps its types.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import numpy_helper

from search.profiles import host_cpu_flags

__all__ = ["exact_int8_twin", "int8_saturates_here"]

# any of these gives ONNX Runtime's MLAS a U8S8 kernel that accumulates in 32 bits
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def int8_saturates_here() -> bool:
    """Whether this is an x86 CPU whose U8S8 kernels saturate (AVX2 or AVX-512 without
    VNNI). False where the flags cannot be read (not Linux, or not x86)."""
    flags = host_cpu_flags()
    return "avx2" in flags and not flags & _VNNI_FLAGS


def exact_int8_twin(model: bytes) -> bytes:
    """``model`` with every int8 tensor of its quantization (weights, and the zero points
    of weights and activations) stored as uint8 plus 128: the same real values, as uint8 x
    uint8; ``model`` itself when it has none."""
    proto = onnx.load_from_string(model)
    inits = {t.name: t for t in proto.graph.initializer}
    shifted: set[str] = set()

    def shift(name: str) -> None:
        tensor = inits.get(name)
        if tensor is None or tensor.data_type != onnx.TensorProto.INT8 or name in shifted:
            return
        values = numpy_helper.to_array(tensor).astype(np.int16) + 128
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), name))
        shifted.add(name)

    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            shift(node.input[2])  # the zero point: activations follow it from int8 to uint8
            if node.op_type == "DequantizeLinear":
                shift(node.input[0])  # stored int8 weights
    if not shifted:
        return model
    graph = proto.graph
    for info in (*graph.value_info, *graph.input, *graph.output):  # shape inference's types
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type == onnx.TensorProto.INT8:
            tensor_type.elem_type = onnx.TensorProto.UINT8
    return proto.SerializeToString()
