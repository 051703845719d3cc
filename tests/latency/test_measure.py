import numpy as np
import pytest

from search.latency import measure_latency, summarize
from search.trial.compress import export_onnx


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


def _with_measure(profile, **settings):
    return profile.model_copy(update={"measure": profile.measure.model_copy(update=settings)})


def test_a_noisy_measurement_is_repeated_then_flagged(task, fast_profile, monkeypatch):
    """No real run has a CV below 1e-9: the measurement is repeated once, then flagged."""
    import search.latency.measure as measure

    calls = []
    real = measure._timed_runs
    monkeypatch.setattr(measure, "_timed_runs", lambda *a: calls.append(1) or real(*a))
    model = export_onnx(task.teacher(), task.input_shape)
    stats = measure_latency(model, _with_measure(fast_profile, max_cv=1e-9), task.input_shape)
    assert len(calls) == 2 and stats.noisy and stats.cv > 1e-9
    calls.clear()
    quiet = measure_latency(model, _with_measure(fast_profile, max_cv=1e6), task.input_shape)
    assert len(calls) == 1 and not quiet.noisy


def test_a_provider_missing_here_is_never_measured_on_the_cpu(task, fast_profile):
    """ONNX Runtime would run a CUDA session on the CPU (with a warning): refused instead."""
    from search._base.errors import TrialError
    from search._base.records import Choices, TrialRecord
    from search.trial.pipeline import measure

    cuda = _with_measure(fast_profile, execution_provider="CUDAExecutionProvider")
    model = export_onnx(task.teacher(), task.input_shape)
    with pytest.raises(TrialError, match="CUDAExecutionProvider"):
        measure_latency(model, cuda, task.input_shape)
    record = TrialRecord(0, Choices(), onnx_model=model)
    with pytest.raises(TrialError, match="measure: this node cannot measure"):
        measure(record, cuda, task.input_shape)
    assert record.latency is None
