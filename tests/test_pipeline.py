import pytest

from search.errors import TrialError
from search.pipeline import compress, run_trial
from search.record import Choices, TrialRecord


def test_one_trial_runs_every_stage(task, layers, fast_profile):
    choices = Choices(structured_ratio=0.25, unstructured_sparsity=0.3, epochs=1, lr=2e-3,
                      precisions={layer.name: "int8" for layer in layers})
    record = run_trial(TrialRecord(0, choices, seed=1), task, fast_profile, threads=2)
    assert set(record.timings) == {"prune", "train", "export", "quantize", "evaluate", "measure"}
    assert record.accuracy > 90 and record.test_accuracy > 90
    assert record.latency.source == "measured" and record.latency.median_ms > 0
    assert record.sparsity >= 0.29
    assert record.macs < 0.8 * 48_907_530  # channels really removed
    assert record.onnx_model and record.size_mb == pytest.approx(len(record.onnx_model) / 1e6)


def test_nan_loss_fails_the_fine_tune_stage(task, layers, fast_profile):
    choices = Choices(epochs=1, lr=1e12, alpha=0.0, precisions={x.name: "fp32" for x in layers})
    with pytest.raises(TrialError) as err:
        compress(TrialRecord(0, choices), task, fast_profile)
    assert err.value.stage == "fine-tune"
