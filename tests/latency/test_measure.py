import numpy as np
import pytest

from search.compress import export_onnx
from search.latency import measure_latency, summarize


def test_summary_statistics_are_sane():
    samples = np.array([1.0, 1.1, 0.9, 1.0, 5.0]) * 1e-3
    stats = summarize(samples, device="d", provider="p")
    assert stats.median_ms == pytest.approx(1.0)
    assert stats.median_ms <= stats.p90_ms <= 5.0
    assert stats.cv > 0 and stats.runs == 5


@pytest.mark.parametrize("bad", [[], [float("nan")], [-1.0]])
def test_summary_rejects_bad_samples(bad):
    with pytest.raises(ValueError):
        summarize(bad, device="d", provider="p")


def test_measurement_on_this_cpu(task, fast_profile):
    model = export_onnx(task.teacher(), task.input_shape)
    stats = measure_latency(model, fast_profile, task.input_shape)
    assert stats.source == "measured"
    assert stats.runs >= fast_profile.measure.min_runs
    assert 0.01 < stats.median_ms < 100
    assert stats.median_ms <= stats.p90_ms
    assert 0 <= stats.cv < 5
    assert stats.provider == "CPUExecutionProvider"
