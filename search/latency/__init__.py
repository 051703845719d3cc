"""Latency of a model on a profile's device: measured, or predicted by a roofline model.

``costing`` reads an ONNX model into per-operation costs, ``model`` turns them into
milliseconds, ``fit`` refits the model's numbers to measurements, ``calibration`` keeps those
measurements and fits, and ``measure`` times a model with ONNX Runtime.
"""

from search.latency.costing import LayerCost, costing, costs_for, costs_from_onnx
from search.latency.fit import ARCHITECTURE_PRIOR, FIT_PRIOR, fit_calibration, fit_parameters
from search.latency.measure import measure_latency, summarize
from search.latency.model import Calibration, predict_latency, predict_ms

__all__ = [
    "ARCHITECTURE_PRIOR",
    "FIT_PRIOR",
    "Calibration",
    "LayerCost",
    "costing",
    "costs_for",
    "costs_from_onnx",
    "fit_calibration",
    "fit_parameters",
    "measure_latency",
    "predict_latency",
    "predict_ms",
    "summarize",
]
