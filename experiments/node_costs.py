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
hardware profile's ``latency_model``:

    python experiments/node_costs.py            # about a minute
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
        nodes.append(helper.make_node("QuantizeLinear", [src, scale, zero], ["q"]))
        nodes[-1].output[0] = "q" if op == "DequantizeLinear" else body
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="runs per model and size")
    args = parser.parse_args()
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
    print("\n  node_ns_per_element:  # experiments/node_costs.py on this host")
    print(f"    default: {default:.3g}")
    for kernel, (rate, _) in sorted(rates.items()):
        print(f"    {kernel}: {rate:.3g}")


if __name__ == "__main__":
    main()
