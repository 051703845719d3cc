"""Apply a per-layer precision plan to an fp32 ONNX model.

int8 uses ONNX Runtime's static QDQ quantization after ``quant_pre_process``
(shape inference and graph cleanup). Layers planned as fp32 are excluded by
ONNX node name. Whether the QDQ pairs fuse into int8 kernels is decided by ONNX
Runtime at session creation; U8S8 fuses on x86, S8S8 often does not.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch

from search._base.errors import TrialError
from search._base.names import INTEGER_PRECISIONS, RUNNABLE_PRECISIONS
from search._base.ort import as_input
from search._base.records import Choices
from search.trial.compress._entropy import kl_threshold
from search.trial.compress.quantize_recurrent import (
    bypass_qdq,
    lstm_layers,
    no_int8_gru_node,
    unrolled_plan,
)

__all__ = ["apply_precision_plan", "output_tail"]

_QTYPES = {"uint8": "QUInt8", "int8": "QInt8", "int16": "QInt16"}
_SUPPORTED = set(RUNNABLE_PRECISIONS)
_INTEGER = set(INTEGER_PRECISIONS)
# ONNX Runtime's name of each of CALIBRATION_METHODS
_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


class _Calibration:
    """Streams calibration batches to ONNX Runtime's calibrator (memory stays flat)."""

    def __init__(self, inputs: torch.Tensor, batch_size: int = 32) -> None:
        self._inputs = inputs
        self._batch_size = batch_size
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self._inputs):
            return None
        batch = self._inputs[self._start : self._start + self._batch_size]
        self._start += self._batch_size
        return {"input": as_input(batch.numpy())}

    def rewind(self) -> None:
        self._start = 0


def _calibration_subset(inputs: torch.Tensor, samples: int, seed: int,
                        batch_size: int = 32) -> torch.Tensor:
    """``samples`` random inputs, rounded down to whole batches: ONNX Runtime's histogram
    calibrators (entropy, percentile) fail on a short last batch."""
    samples = min(samples, len(inputs))
    if samples >= batch_size:
        samples -= samples % batch_size
    gen = torch.Generator().manual_seed(seed)
    return inputs[torch.randperm(len(inputs), generator=gen)[:samples]]


def apply_precision_plan(model: bytes, precisions: dict[str, str], node_names: dict[str, str],
                         choices: Choices, calibration: torch.Tensor, *, reduce_range: bool,
                         seed: int = 0) -> bytes:
    """Return ``model`` with each layer in its planned precision."""
    unknown = sorted({p for p in precisions.values()} - _SUPPORTED)
    if unknown:
        raise TrialError("quantize", f"precisions {unknown} are not implemented yet "
                                     f"(supported: {sorted(_SUPPORTED)})")
    no_int8_gru_node(model, precisions, node_names)
    precisions, node_names, gates = unrolled_plan(model, precisions, node_names)
    recurrent = lstm_layers(model, precisions, node_names)
    wanted = {layer: p for layer, p in precisions.items() if layer in recurrent}
    precisions = {layer: "fp32" if layer in recurrent else p for layer, p in precisions.items()}
    if any(p in _INTEGER for p in precisions.values()):
        if choices.quant_mode == "dynamic":
            model = _quantize_dynamic(model, precisions, node_names, choices,
                                      reduce_range=reduce_range)
        else:
            model = _quantize_integer(model, precisions, node_names, choices, calibration,
                                      reduce_range=reduce_range, seed=seed, float_nodes=gates)
    if any(p == "int4" for p in precisions.values()):
        model = _to_int4(model, precisions, node_names)
    if any(p == "fp16" for p in precisions.values()):
        model = _to_fp16(model, precisions, node_names)
    if any(p != "fp32" for p in wanted.values()):
        model = _quantize_recurrent(model, wanted, recurrent, reduce_range=reduce_range)
    return model


def _quantize_recurrent(model: bytes, precisions: dict[str, str], nodes: dict[str, list[str]],
                        *, reduce_range: bool) -> bytes:
    """int8 LSTM layers as ONNX Runtime's DynamicQuantizeLSTM: int8 weights, activations
    quantized per run (the only int8 LSTM it has, a CPU kernel; there is no static QDQ form).
    On the 2-core Xeon with VNNI, a 2-layer LSTM over 32 steps at batch 1: 0.85x fp32 at
    hidden 64, 1.5x at 128-256, 3.6x at 512-1024, so measurement decides per trial."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    bad = {layer: p for layer, p in precisions.items() if p not in ("fp32", "int8")}
    if bad:
        raise TrialError("quantize", f"LSTM layers run in fp32 or int8 only, got {bad}")
    targets = sorted(n for layer, p in precisions.items() if p == "int8" for n in nodes[layer])
    with tempfile.TemporaryDirectory(prefix="search-quant-") as tmp, _quiet():
        src, out = Path(tmp) / "model.onnx", Path(tmp) / "lstm.onnx"
        src.write_bytes(model)
        try:
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8,
                             reduce_range=reduce_range, nodes_to_quantize=targets,
                             op_types_to_quantize=["LSTM"])
        except Exception as exc:
            raise TrialError("quantize", f"int8 LSTM: {type(exc).__name__}: {exc}") from exc
        result = out.read_bytes()
    left = [n.name for n in onnx.load_from_string(result).graph.node if n.name in targets]
    if left:
        raise TrialError("quantize", f"ONNX Runtime left these LSTM nodes in float: {left}")
    return result


def _to_fp16(model: bytes, precisions: dict[str, str], node_names: dict[str, str]) -> bytes:
    """Convert the fp16 layers (and the ops between them) to fp16; inputs/outputs stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load_from_string(model)
    keep = {node_names[layer] for layer, p in precisions.items() if p != "fp16"}
    keep |= {n.name for n in proto.graph.node  # LSTMs run fp32 or int8 (DynamicQuantizeLSTM)
             if n.op_type in ("QuantizeLinear", "DequantizeLinear", "LSTM", "GRU", "RNN")}
    try:
        converted = convert_float_to_float16(proto, keep_io_types=True,
                                             node_block_list=sorted(keep))
    except Exception as exc:
        raise TrialError("quantize", f"fp16 conversion failed: {type(exc).__name__}: {exc}") from exc
    return converted.SerializeToString()


def _pre_process(src: Path, pre: Path) -> None:
    """ONNX Runtime's ``quant_pre_process``; where its symbolic shape inference cannot
    follow the graph (Swin's shifted-window reshapes: "Incomplete symbolic shape
    inference"), again with ONNX's own shape inference, which is what static quantization
    needs (the optimizer's Conv+BN folding still runs)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.time()
    try:
        quant_pre_process(str(src), str(pre))
    except Exception as exc:  # ONNX Runtime raises a bare Exception here
        if "symbolic shape inference" not in str(exc).lower():
            raise
        _remove_shape_dump(started)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)


def _remove_shape_dump(since: float) -> None:
    """Delete what ONNX Runtime's failed symbolic shape inference saves in the working
    directory (``sym_shape_infer_temp.onnx`` and its external-data file): a user's
    directory, or every Ray worker's, would collect one per trial."""
    dump = Path("sym_shape_infer_temp.onnx")
    try:
        if dump.stat().st_mtime < since - 1:  # not ours
            return
        graph = onnx.load(str(dump), load_external_data=False).graph
        for location in {e.value for t in graph.initializer for e in t.external_data
                         if e.key == "location"}:
            Path(location).unlink(missing_ok=True)
        dump.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - best effort: another process's cleanup came first
        pass


def _quantize_integer(model: bytes, precisions: dict[str, str], node_names: dict[str, str],
                      choices: Choices, calibration: torch.Tensor, *, reduce_range: bool,
                      seed: int, float_nodes: frozenset[str] = frozenset()) -> bytes:
    """Static QDQ for the int8/int16 layers; every other layer is excluded by node name
    (``float_nodes``, an int8 unrolled GRU's gates, read their inputs in plain fp32).

    The precision of an integer layer is the precision of its weights; int16
    layers get int16 weights through per-tensor overrides (GNA runs int8 or
    int16 weights with int16 activations).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    exclude = [node_names[layer] for layer, p in precisions.items() if p not in _INTEGER]
    wide = {node_names[layer] for layer, p in precisions.items() if p == "int16"}
    subset = _calibration_subset(calibration, choices.calibration_samples, seed)
    with tempfile.TemporaryDirectory(prefix="search-quant-") as tmp, _quiet():
        src, pre, out = (Path(tmp) / n for n in ("model.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(model)
        try:
            _pre_process(src, pre)
            tail = sorted(output_tail(onnx.load(str(pre)).graph))
            overrides = {}
            if wide:
                weights = {n.name: n.input[1] for n in onnx.load(str(pre)).graph.node
                           if n.name in wide and len(n.input) > 1}
                overrides = {w: [{"quant_type": QuantType.QInt16}] for w in weights.values()}
            if choices.calibration_method == "entropy":
                overrides.update(_entropy_ranges(pre, Path(tmp), subset,
                                                 choices.activation_symmetric))
            quantize_static(
                str(pre),
                str(out),
                _Calibration(subset),
                quant_format=QuantFormat.QDQ,
                activation_type=getattr(QuantType, _QTYPES[choices.activation_type]),
                weight_type=getattr(QuantType, _QTYPES[choices.weight_type]),
                per_channel=choices.per_channel,
                reduce_range=reduce_range,
                nodes_to_exclude=exclude + tail,
                calibrate_method=getattr(CalibrationMethod,
                                         _CALIBRATION[choices.calibration_method]),
                extra_options={
                    "ActivationSymmetric": choices.activation_symmetric,
                    "WeightSymmetric": True,
                    "TensorQuantOverrides": overrides,
                },
            )
        except TrialError:
            raise
        except Exception as exc:
            raise TrialError("quantize", f"{type(exc).__name__}: {exc}") from exc
        result = out.read_bytes()
    graph = onnx.load_from_string(result)
    bypass_qdq(graph, float_nodes)
    _feed_fp32_layers_fp32(graph, set(exclude) - float_nodes)
    onnx.checker.check_model(graph)
    return graph.SerializeToString()


_WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"})


def output_tail(graph: onnx.GraphProto) -> set[str]:
    """The nodes after the last weighted layers: no Conv, Gemm, MatMul or recurrent node
    lies between them and the graph's outputs.

    The quantizer leaves them in float, reading each last layer's output through its own
    scale. Quantized, they would give one scale to whatever they merge: a detector's output
    concatenates class logits, box offsets and centerness over every level, and one uint8
    scale for all of them cost the bundled FCOS 1.5 of its 2.7 points of mAP@[.5:.95] lost
    to int8 (mAP@.5 0.8), at no speed gain (measured side by side: 2.60x fp32 with the tail
    in float, 2.62x without).
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weighted_below: dict[int, bool] = {}

    def feeds_weighted(node: onnx.NodeProto) -> bool:
        if id(node) not in weighted_below:
            weighted_below[id(node)] = any(
                c.op_type in _WEIGHTED_OPS or feeds_weighted(c)
                for out in node.output for c in consumers.get(out, []))
        return weighted_below[id(node)]

    return {node.name for node in graph.node
            if node.name and node.op_type not in _WEIGHTED_OPS and not feeds_weighted(node)}


def _entropy_ranges(model: Path, tmp: Path, inputs: torch.Tensor,
                    symmetric: bool) -> dict[str, list[dict[str, np.ndarray]]]:
    """Activation ranges by KL-divergence (entropy) calibration, as tensor overrides.

    ``quantize_static`` builds its entropy calibrator with 128 histogram bins
    and 128 quantized bins, which can only ever return the min-max range, and
    does not pass a bin count through; 2048 bins (as TensorRT's entropy
    calibrator uses) give the method room to clip outliers.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(
        str(model), augmented_model_path=str(tmp / "entropy-augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": 2048, "num_quantized_bins": 128, "symmetric": symmetric},
    )
    calibrator.collect_data(_Calibration(inputs))
    out = {}
    for name, histogram in calibrator.collector.histogram_dict.items():
        low, high = kl_threshold(histogram, num_quantized_bins=128)  # ORT's, 8x faster
        out[name] = [{"rmin": np.asarray(low, np.float32).reshape(()),
                      "rmax": np.asarray(high, np.float32).reshape(())}]
    del calibrator
    return out


@contextmanager
def _quiet() -> Iterator[None]:
    """The quantizers log INFO and opset notes on the root logger, and the histogram
    calibrators print to stdout."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as sink, redirect_stdout(sink):
            yield
    finally:
        root.setLevel(level)


def _gemm_to_matmul(proto: onnx.ModelProto, names: set[str]) -> None:
    """Rewrite the named Gemm nodes (constant weights) as MatMul + Add, keeping the name.

    ONNX Runtime's dynamic and 4-bit weight-only quantizers handle MatMul, not
    Gemm, and the exporter writes every Linear as a Gemm.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.name not in names or node.input[1] not in inits
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        w_name = f"{node.input[1]}_matmul"
        proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight),
                                                               w_name))
        product = node.output[0] if len(node.input) < 3 else f"{node.name}_product"
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=node.name))
        if len(node.input) >= 3:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                          name=f"{node.name}_bias"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _quantize_dynamic(model: bytes, precisions: dict[str, str], node_names: dict[str, str],
                      choices: Choices, *, reduce_range: bool) -> bytes:
    """Dynamic int8: weights quantized ahead, activation ranges computed per inference
    (no calibration data; ConvInteger / MatMulInteger kernels with uint8 activations)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    targets = {node_names[layer] for layer, p in precisions.items() if p == "int8"}
    proto = onnx.load_from_string(model)
    _gemm_to_matmul(proto, targets)
    with tempfile.TemporaryDirectory(prefix="search-quant-") as tmp, _quiet():
        src, out = Path(tmp) / "model.onnx", Path(tmp) / "dynamic.onnx"
        onnx.save(proto, str(src))
        try:
            quantize_dynamic(str(src), str(out), weight_type=getattr(
                QuantType, _QTYPES[choices.weight_type]), per_channel=choices.per_channel,
                reduce_range=reduce_range, nodes_to_quantize=sorted(targets),
                op_types_to_quantize=["Conv", "MatMul"])
        except Exception as exc:
            raise TrialError("quantize", f"dynamic: {type(exc).__name__}: {exc}") from exc
        return out.read_bytes()


def _to_int4(model: bytes, precisions: dict[str, str], node_names: dict[str, str]) -> bytes:
    """4-bit weight-only (MatMulNBits, block 32, symmetric) for the int4 MatMul/Gemm layers."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    targets = {node_names[layer] for layer, p in precisions.items() if p == "int4"}
    proto = onnx.load_from_string(model)
    _gemm_to_matmul(proto, targets)
    with _quiet():
        try:
            quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=32, is_symmetric=True,
                                             nodes_to_include=sorted(targets),
                                             op_types_to_quantize=("MatMul",))
            quantizer.process()
        except Exception as exc:
            raise TrialError("quantize", f"int4: {type(exc).__name__}: {exc}") from exc
    result = quantizer.model.model
    left = [n.name for n in result.graph.node if n.name in targets and n.op_type != "MatMulNBits"]
    if left:
        raise TrialError("quantize", f"int4 weight-only quantization only applies to MatMul/Gemm "
                                     f"layers; left in float: {left}")
    return result.SerializeToString()


def _feed_fp32_layers_fp32(model: onnx.ModelProto, fp32_nodes: set[str]) -> None:
    """Give an fp32 layer its input in fp32, through a Clip instead of a Q -> DQ pair.

    The quantizer leaves an excluded Conv between DequantizeLinear and
    QuantizeLinear when its neighbours are int8, and ONNX Runtime (1.20+) then
    quantizes its fp32 weights itself, so the "fp32" layer would run in int8.
    The Q -> DQ pair may also carry a fused ReLU (a zero point at the bottom of
    the range clamps negatives), so it is replaced by the Clip to the same
    range, which keeps the semantics in fp32.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    new_nodes = []
    for node in model.graph.node:
        if node.name in fp32_nodes and node.input:
            dq = producers.get(node.input[0])
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and len(q.input) >= 3 \
                    and q.input[1] in inits and q.input[2] in inits:
                scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
                zero = numpy_helper.to_array(inits[q.input[2]])
                info = np.iinfo(zero.dtype)
                zf = zero.astype(np.float32)
                lo = ((info.min - zf) * scale).astype(np.float32).reshape(())
                hi = ((info.max - zf) * scale).astype(np.float32).reshape(())
                base = f"{node.name}_fp32_input"
                model.graph.initializer.extend([numpy_helper.from_array(lo, f"{base}_lo"),
                                                numpy_helper.from_array(hi, f"{base}_hi")])
                new_nodes.append(helper.make_node("Clip", [q.input[0], f"{base}_lo", f"{base}_hi"],
                                                  [base], name=f"{base}_clip"))
                node.input[0] = base
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
