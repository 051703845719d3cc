"""What ONNX Runtime's CPU provider spends per element in the nodes that are not Conv/Gemm/MatMul.

The latency model costs a runtime node as ``node_overhead_us + elements x
node_ns_per_element[op type]`` (``default`` for op types not listed). Those
rates differ by an order of magnitude between op types on one core: a ReLU
streams its tensor, an int8 softmax (QLinearSoftmax) spends several
nanoseconds per element, seven times its fp32 form. A single overhead per node
cannot say that, and a fit of one then makes every node of a small CNN dear
to pay for a transformer's softmaxes.

Each op is timed in a one-node model after a ReLU (or, for int8 ops, between a
QuantizeLinear / DequantizeLinear pair that ONNX Runtime fuses into its QLinear
kernel) against the same model without it, at three sizes, 1 thread, medians of
many runs; a line through the three gives the rate (and a per-node constant,
printed for comparison with ``node_overhead_us``). Prints the YAML for a
hardware profile's ``latency_model``. With ``--convolutions``, also what a
depthwise convolution spends per MAC and what an int8 3x3 one spends on its
im2col copy (the profile's ``depthwise_efficiency`` and ``im2col_ns_per_copy``):

    python tools/node_costs.py                  # about 10 s
    python tools/node_costs.py --convolutions   # about a minute more
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SIZES = ((1, 4, 16, 16), (1, 8, 32, 64), (1, 16, 64, 64))  # 1 k, 16 k, 64 k elements


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _extra_us(model: bytes, base: bytes, shape: tuple[int, ...], runs: int,
              rounds: int = 5) -> float:
    """Median over ``rounds`` of (``model``'s median time - ``base``'s), the two measured
    alternately so that the machine's load changes both alike."""
    sessions = [_session(model), _session(base)]
    feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for session in sessions:
        for _ in range(runs // 5):
            session.run(None, feed)
    diffs = []
    for _ in range(rounds):
        medians = []
        for session in sessions:
            times = []
            for _ in range(runs // rounds):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times))
        diffs.append((medians[0] - medians[1]) * 1e6)
    return statistics.median(diffs)


def _model(op: str | None, shape: tuple[int, ...], int8: bool) -> bytes:
    """x -> ReLU -> op -> y (fp32), or x -> Q -> DQ -> op -> Q -> DQ -> y (int8: fused)."""
    nodes, inits = [helper.make_node("Relu", ["x"], ["r"])], []
    out_shape = list(shape)

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    src = "r"
    if int8:
        scale, zero = const("s", np.array(0.05, np.float32)), const("z", np.array(128, np.uint8))
        nodes += [helper.make_node("QuantizeLinear", ["r", scale, zero], ["rq"]),
                  helper.make_node("DequantizeLinear", ["rq", scale, zero], ["rd"])]
        src = "rd"
    body = "y" if not int8 else "o"
    if op is None:
        nodes.append(helper.make_node("Identity", [src], [body]))
    elif op in ("QuantizeLinear", "DequantizeLinear"):  # standalone: an fp32/int8 boundary
        scale, zero = const("s", np.array(0.05, np.float32)), const("z", np.array(128, np.uint8))
        quantized = "q" if op == "DequantizeLinear" else body
        nodes.append(helper.make_node("QuantizeLinear", [src, scale, zero], [quantized]))
        if op == "DequantizeLinear":
            nodes.append(helper.make_node("DequantizeLinear", ["q", scale, zero], [body]))
    elif op in ("Add", "Div", "Mul"):
        if int8:  # a quantized operand, or the op is not fused into its QLinear kernel
            c = const("cq", np.full(shape, 150, np.uint8))
            nodes.append(helper.make_node("DequantizeLinear", [c, "s", "z"], ["c"]))
            c = "c"
        else:
            c = const("c", np.full(shape, 1.1, np.float32))
        nodes.append(helper.make_node(op, [src, c], [body]))
    elif op == "Transpose":
        nodes.append(helper.make_node(op, [src], [body], perm=[0, 2, 1, 3]))
        out_shape = [shape[0], shape[2], shape[1], shape[3]]
    elif op == "Softmax":
        nodes.append(helper.make_node(op, [src], [body], axis=-1))
    elif op == "LayerNormalization":
        g, b = const("g", np.ones(shape[-1], np.float32)), const("b", np.zeros(shape[-1], np.float32))
        nodes.append(helper.make_node(op, [src, g, b], [body], axis=-1))
    elif op in ("MaxPool", "AveragePool"):
        nodes.append(helper.make_node(op, [src], [body], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    elif op == "GlobalAveragePool":
        nodes.append(helper.make_node(op, [src], [body]))
        out_shape = [shape[0], shape[1], 1, 1]
    elif op == "ReduceMean":
        axes = const("axes", np.array([-1], np.int64))
        nodes.append(helper.make_node(op, [src, axes], [body], keepdims=1))
        out_shape = [*shape[:-1], 1]
    elif op == "Concat":
        nodes.append(helper.make_node(op, [src, src], [body], axis=1))
        out_shape = [shape[0], 2 * shape[1], *shape[2:]]
    else:  # unary: Sigmoid, Tanh, Erf, HardSwish, Clip ...
        nodes.append(helper.make_node(op, [src], [body]))
    if int8:
        nodes += [helper.make_node("QuantizeLinear", ["o", "s", "z"], ["oq"]),
                  helper.make_node("DequantizeLinear", ["oq", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(
                                  "y", TensorProto.UINT8 if op == "QuantizeLinear" else
                                  TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def _runtime_op(model: bytes) -> list[str]:
    """The op types ONNX Runtime really runs for ``model`` (to name int8 ops by their kernel)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # not the warning that the saved graph is host-specific
        options.optimized_model_filepath = str(Path(tmp) / "o.onnx")
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


FLOAT_OPS = ("QuantizeLinear", "DequantizeLinear", "Relu", "Clip", "Add", "Mul", "Div",
             "Transpose", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
             "Sigmoid", "Tanh", "Erf", "HardSwish", "Softmax", "LayerNormalization")
INT8_OPS = ("Add", "Mul", "Softmax", "Sigmoid", "AveragePool", "GlobalAveragePool", "Concat")


def _conv_chain(channels: int, side: int, kernel: int, depthwise: bool, n: int,
                int8: bool) -> bytes:
    """``n`` x (Conv, ReLU), exported as the search exports (and quantized as its static
    U8S8 mode does: QDQ, per-channel int8 weights), so ONNX Runtime fuses them as it fuses a
    searched model's layers; a chain pays the layout conversions at its ends once."""
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from search.trial.compress import export_onnx

    torch.manual_seed(0)
    layers = []
    for _ in range(n):
        layers += [torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2,
                                   groups=channels if depthwise else 1), torch.nn.ReLU()]
    model = export_onnx(torch.nn.Sequential(*layers), (channels, side, side))
    if not int8:
        return model
    name = onnx.load_from_string(model).graph.input[0].name
    rng = np.random.default_rng(0)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: rng.standard_normal((1, channels, side, side))
                                  .astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
        return dst.read_bytes()


def _per_conv_us(channels: int, side: int, kernel: int, depthwise: bool, int8: bool,
                 runs: int) -> float:
    shape = (1, channels, side, side)
    one, nine = (_conv_chain(channels, side, kernel, depthwise, n, int8) for n in (1, 9))
    name = onnx.load_from_string(one).graph.input[0].name
    return _extra_us(_rename_input(nine, name), _rename_input(one, name), shape, runs) / 8


def _rename_input(model: bytes, name: str) -> bytes:
    """The timing helpers feed ``x``."""
    proto = onnx.load_from_string(model)
    for node in proto.graph.node:
        node.input[:] = ["x" if i == name else i for i in node.input]
    proto.graph.input[0].name = "x"
    return proto.SerializeToString()


def _convolutions(runs: int) -> None:
    """Per layer, in chains of 9 against 1: 3x3 depthwise convolutions (ns per MAC; a
    profile's depthwise_efficiency is 2 / (ns per MAC x peak operations per ns)), and int8
    3x3 dense ones against a 1x1 doing the same MACs (three times the channels, in and out):
    what is left is the im2col copy, per output pixel and tap (im2col_ns_per_copy)."""
    for int8 in (False, True):
        for channels, side in ((16, 32), (32, 16), (64, 8)):
            us = _per_conv_us(channels, side, 3, True, int8, runs)
            print(f"depthwise 3x3 {'int8' if int8 else 'fp32'} {channels} channels at "
                  f"{side}x{side}: {us:6.2f} us a layer, "
                  f"{us * 1e3 / (channels * side * side * 9):.3f} ns/MAC", flush=True)
    for channels, side in ((16, 32), (32, 16), (32, 32)):
        dense = _per_conv_us(channels, side, 3, False, True, runs)
        pointwise = _per_conv_us(3 * channels, side, 1, False, True, runs)
        print(f"dense 3x3 int8 {channels} channels at {side}x{side}: {dense:6.2f} us a layer, "
              f"a 1x1 of the same MACs {pointwise:6.2f} us: "
              f"{(dense - pointwise) * 1e3 / (side * side * 9):.2f} ns per pixel and tap",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="runs per model and size")
    parser.add_argument("--convolutions", action="store_true",
                        help="also time depthwise and im2col convolutions (about a minute)")
    args = parser.parse_args()
    if args.convolutions:
        _convolutions(args.runs)
    rates: dict[str, tuple[float, float]] = {}
    for int8, ops in ((False, FLOAT_OPS), (True, INT8_OPS)):
        for op in ops:
            sample = _model(op, SIZES[0], int8)
            kernels = _runtime_op(sample)
            kernel = next((k for k in kernels if k.startswith("QLinear") and op in k), None) \
                if int8 else None
            kernel = kernel or next((k for k in kernels if op in k), op)
            extra = [_extra_us(_model(op, s, int8), _model(None, s, int8), s, args.runs)
                     for s in SIZES]
            if op == "DequantizeLinear":  # timed after a QuantizeLinear: take that one off
                q, _ = rates["QuantizeLinear"]
                extra = [e - q * 1e-3 * np.prod(s) for e, s in zip(extra, SIZES, strict=True)]
            elems = [max(np.prod(s), 1) for s in SIZES]
            slope, constant = np.polyfit(elems, extra, 1)
            rates[kernel] = (max(slope * 1e3, 0.0), constant)
            print(f"{kernel:<26} {' '.join(f'{e:7.2f}' for e in extra)} us at "
                  f"{'/'.join(str(int(e)) for e in elems)} elements: {slope * 1e3:.3f} ns/element"
                  f", {constant:+.2f} us per node", flush=True)
    default = statistics.median(r for r, _ in rates.values())
    print("\n  node_ns_per_element:  # tools/node_costs.py on this host")
    print(f"    default: {default:.3g}")
    for kernel, (rate, _) in sorted(rates.items()):
        print(f"    {kernel}: {rate:.3g}")


if __name__ == "__main__":
    main()
