"""Refitting the latency model to measurements finds the factors that made them."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from search.latency.costing import costs_from_onnx
from search.latency.fit import fit_calibration
from search.latency.model import Calibration, predict_ms
from search.profiles import load_profile
from search.trial.compress import prune_structured
from tests.support.latency import fp32_and_int8


def test_calibration_refit_recovers_known_factors(pruned_models):
    """Measurements generated from known factors: the fit must find them again."""
    profile = load_profile("cpu-avx512-vnni")
    truth = Calibration({"fp32": 0.2, "int8": 0.05}, op_overhead_us=9.0, session_overhead_us=40.0)
    samples = []
    for model in pruned_models.values():
        for p in ("fp32", "int8"):
            costs = [type(c)(**{**c.__dict__, "precision": p}) for c in costs_from_onnx(model)]
            samples.append((costs, predict_ms(costs, profile, truth)))
    fitted = fit_calibration(samples, profile, prior=0.0)
    errors = [abs(predict_ms(c, profile, fitted) / ms - 1) for c, ms in samples]
    assert np.max(errors) < 0.02
    assert fitted.fitted_on == len(samples)
    # pulled towards the profile's numbers (the default), six measurements still move the
    # fit most of the way from them, but not all the way
    pulled = fit_calibration(samples, profile)
    profile_errors = [abs(predict_ms(c, profile) / ms - 1) for c, ms in samples]
    pulled_errors = [abs(predict_ms(c, profile, pulled) / ms - 1) for c, ms in samples]
    assert 0.02 < np.max(pulled_errors) < 0.25 * np.max(profile_errors)


def test_a_refit_on_executed_graphs_fits_the_node_overhead(task):
    """Latencies made from a known node overhead: the fit finds it (it is what an
    int8 transformer's standalone quantize nodes cost), and the fit of exported-graph
    samples leaves it unset."""
    from search.latency.costing import costs_for
    from tests.families import EncoderClassifier

    profile = load_profile("cpu-avx512-vnni")
    # without the cache term: its DRAM rate is one more unknown than six models pin down
    profile = profile.model_copy(update={"latency_model": profile.latency_model.model_copy(
        update={"cache_mb": None, "dram_gbps": None})})
    truth = Calibration({"fp32": 0.5, "int8": 0.3}, op_overhead_us=2.0, session_overhead_us=30.0,
                        node_overhead_us=6.0)
    models = [m for m in fp32_and_int8(task.teacher(), task.input_shape)]
    torch.manual_seed(0)
    models += list(fp32_and_int8(EncoderClassifier(), (3, 32, 32)))
    for ratio in (0.25, 0.5):  # as many models as the fit has unknowns, and a few more
        model = task.teacher()
        prune_structured(model, torch.zeros(1, *task.input_shape), ratio, round_to=8)
        models += list(fp32_and_int8(model, task.input_shape))
    samples = [(costs_for(m, profile), 0.0) for m in models]
    samples = [(c, predict_ms(c, profile, truth)) for c, _ in samples]
    fitted = fit_calibration(samples, profile, prior=0.0)  # what the data alone say
    assert fitted.node_overhead_us == pytest.approx(6.0, rel=0.15)
    assert max(abs(predict_ms(c, profile, fitted) / ms - 1) for c, ms in samples) < 0.03
    plain = fit_calibration([(costs_from_onnx(m), ms) for m, (_, ms) in zip(models, samples,
                                                                             strict=True)],
                            profile)
    assert plain.node_overhead_us == profile.latency_model.node_overhead_us


def test_memory_efficiency_is_refit_per_precision():
    """ONNX Runtime's int8 kernels stream a weight-bound layer's weights (few output pixels,
    or a Linear at batch 1) at about half the fp32 rate on the 2-core Xeon, while compute-bound
    layers run int8 ~3x faster: one memory efficiency shared by every precision cannot fit
    both, and held-out int8 CNNs were then predicted slower than their fp32 forms."""
    from search.latency.costing import LayerCost

    profile = load_profile("cpu-avx512-vnni")
    truth = Calibration({"fp32": 0.7, "int8": 0.5}, op_overhead_us=2.0, session_overhead_us=40.0,
                        memory_efficiency={"fp32": 2.0, "int8": 0.4})
    samples = []
    for width in (64, 128, 256, 512):
        weight_bound = [LayerCost(f"fc{i}", "Gemm", "fp32", macs=width * width,
                                  weight_elems=width * width, in_elems=width, out_elems=width)
                        for i in range(4)]
        compute_bound = [LayerCost(f"conv{i}", "Conv", "fp32", macs=width * 9 * 64 * 256,
                                   weight_elems=width * 9 * 64, in_elems=64 * 256,
                                   out_elems=width * 256) for i in range(4)]
        for layers in (weight_bound, compute_bound, weight_bound + compute_bound):
            for p in ("fp32", "int8"):
                costs = [type(c)(**{**c.__dict__, "precision": p}) for c in layers]
                samples.append((costs, predict_ms(costs, profile, truth)))
    fitted = fit_calibration(samples, profile, prior=0.0)
    errors = [abs(predict_ms(c, profile, fitted) / ms - 1) for c, ms in samples]
    assert np.max(errors) < 0.03
    assert fitted.memory_efficiency["int8"] < 0.5 * fitted.memory_efficiency["fp32"]


def test_a_device_faster_than_its_profiles_nominal_peak_is_fitted(pruned_models):
    """A profile's peaks are nominal for a class of device (``cpu-avx512-vnni`` spans
    Cascade Lake to Zen 5, whose cores ran the digits ResNet's fp32 model 2x faster than a
    Xeon's): a machine may run its kernels above the nominal peak, and a fit must be able to
    say so instead of stopping at efficiency 1 and blaming the overheads."""
    profile = load_profile("cpu-avx512-vnni")
    truth = Calibration({"fp32": 1.6, "int8": 1.3}, op_overhead_us=1.0, session_overhead_us=2.0)
    samples = []
    for model in pruned_models.values():
        for p in ("fp32", "int8"):
            costs = [replace(c, precision=p) for c in costs_from_onnx(model)]
            samples.append((costs, predict_ms(costs, profile, truth)))
    fitted = fit_calibration(samples, profile, prior=0.0)
    errors = [abs(predict_ms(c, profile, fitted) / ms - 1) for c, ms in samples]
    assert np.max(errors) < 0.02
    assert fitted.efficiency["fp32"] > 1.0
