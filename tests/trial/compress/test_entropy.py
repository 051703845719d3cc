"""The fast KL threshold must pick exactly the range ONNX Runtime's own loop picks."""

import numpy as np
import pytest
from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCollector, create_calibrator

from search.trial.compress import export_onnx
from search.trial.compress._entropy import kl_threshold
from search.trial.compress.quantize import _Calibration


def _collector(num_bins: int) -> HistogramCollector:
    return HistogramCollector("entropy", symmetric=False, num_bins=num_bins,
                              num_quantized_bins=128, percentile=99.999, scenario="same")


def _assert_same(collector: HistogramCollector, histogram: tuple) -> None:
    expected = collector.get_entropy_threshold(histogram, 128)
    got = kl_threshold(histogram, 128)
    assert (got[0], got[1]) == (expected[0], expected[1])
    assert got[0].dtype == expected[0].dtype == np.float32


def test_same_threshold_as_onnx_runtime_on_real_activations(task, tmp_path):
    model = tmp_path / "fp32.onnx"
    model.write_bytes(export_onnx(task.teacher(), task.input_shape))
    calibrator = create_calibrator(str(model), augmented_model_path=str(tmp_path / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"num_bins": 512, "num_quantized_bins": 128})
    calibrator.collect_data(_Calibration(task.calibration[:128]))
    histograms = calibrator.collector.histogram_dict
    assert len(histograms) >= 10
    # the input, a ReLU output and the logits: different shapes of distribution
    names = list(histograms)
    for name in (names[0], names[len(names) // 2], names[-1]):
        _assert_same(calibrator.collector, histograms[name])


@pytest.mark.parametrize("kind", ["heavy-tailed", "one-sided", "constant", "few-samples"])
def test_same_threshold_as_onnx_runtime_on_synthetic_histograms(kind):
    rng = np.random.default_rng(0)
    data = {"heavy-tailed": rng.standard_t(2, size=5000),
            "one-sided": np.maximum(rng.laplace(size=5000), 0),
            "constant": np.ones(100),
            "few-samples": rng.normal(size=40)}[kind].astype(np.float32)
    collector = _collector(2048 if kind == "heavy-tailed" else 700)
    collector.collect_value({"x": data})
    collector.collect_value({"x": data * np.float32(1.7)})  # a merge that widens the range
    _assert_same(collector, collector.histogram_dict["x"])


def test_heavy_tails_are_clipped_and_the_range_stays_within_the_data():
    data = np.random.default_rng(1).standard_t(2, size=20000).astype(np.float32)
    collector = _collector(2048)
    collector.collect_value({"x": data})
    low, high = kl_threshold(collector.histogram_dict["x"])
    assert data.min() <= low < 0 < high <= data.max()
    assert high < 0.5 * np.abs(data).max()  # the outliers are clipped, not kept
