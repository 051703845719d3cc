"""Apply a per-layer precision plan to an fp32 ONNX model.

int8 uses ONNX Runtime's static QDQ quantization after ``quant_pre_process``
(shape inference and graph cleanup). Layers planned as fp32 are excluded by
ONNX node name. Whether the QDQ pairs fuse into int8 kernels is decided by ONNX
Runtime at session creation; U8S8 fuses on x86, S8S8 often does not.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from search.errors import TrialError
from search.record import Choices

__all__ = ["apply_precision_plan"]

_QTYPES = {"uint8": "QUInt8", "int8": "QInt8"}
_SUPPORTED = {"fp32", "int8"}


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
        return {"input": batch.numpy().astype(np.float32)}

    def rewind(self) -> None:
        self._start = 0


def _calibration_subset(inputs: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    if samples >= len(inputs):
        return inputs
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
    if not any(p == "int8" for p in precisions.values()):
        return model
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    exclude = [node_names[layer] for layer, p in precisions.items() if p == "fp32"]
    subset = _calibration_subset(calibration, choices.calibration_samples, seed)
    with tempfile.TemporaryDirectory(prefix="search-quant-") as tmp:
        src, pre, out = (Path(tmp) / n for n in ("model.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(model)
        root = logging.getLogger()
        level = root.level
        try:
            root.setLevel(logging.WARNING)  # the quantizer logs at INFO on the root logger
            quant_pre_process(str(src), str(pre))
            quantize_static(
                str(pre),
                str(out),
                _Calibration(subset),
                quant_format=QuantFormat.QDQ,
                activation_type=getattr(QuantType, _QTYPES[choices.activation_type]),
                weight_type=getattr(QuantType, _QTYPES[choices.weight_type]),
                per_channel=choices.per_channel,
                reduce_range=reduce_range,
                nodes_to_exclude=exclude,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={
                    "ActivationSymmetric": choices.activation_symmetric,
                    "WeightSymmetric": True,
                },
            )
        except TrialError:
            raise
        except Exception as exc:
            raise TrialError("quantize", f"{type(exc).__name__}: {exc}") from exc
        finally:
            root.setLevel(level)
        result = out.read_bytes()
    graph = onnx.load_from_string(result)
    _feed_fp32_layers_fp32(graph, set(exclude))
    onnx.checker.check_model(graph)
    return graph.SerializeToString()


def _feed_fp32_layers_fp32(model: onnx.ModelProto, fp32_nodes: set[str]) -> None:
    """Rewire an fp32 layer's input around the Q -> DQ pair in front of it.

    The quantizer leaves an excluded Conv between DequantizeLinear and
    QuantizeLinear when its neighbours are int8, and ONNX Runtime (1.20+) then
    quantizes its fp32 weights itself, so the "fp32" layer would run in int8.
    Feeding it the fp32 tensor from before the QuantizeLinear keeps it fp32.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.name not in fp32_nodes or not node.input:
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            node.input[0] = q.input[0]
