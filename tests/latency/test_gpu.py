"""GPU profiles: measured only on the GPU they describe, through TensorRT; checked without one."""

from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from search._base.errors import ConfigError
from search._base.ort import make_session, provider_loads
from search.config import SearchConfig
from search.profiles import gpu_matches, load_profile, local_gpu_names, measurable_here
from search.study.run import run_search

GPU_PROFILES = ["t4-gpu", "a100-gpu", "h100-gpu", "h200-gpu"]
ROOT = Path(__file__).resolve().parents[2]
needs_tensorrt = pytest.mark.skipif(
    "TensorrtExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu with TensorRT (pip install -e '.[gpu]') and an NVIDIA GPU")


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_a_gpu_profile_is_measured_only_on_the_gpu_it_names(name):
    profile = load_profile(name)
    assert profile.requires.gpu_names, "a GPU profile must name the device it describes"
    wanted = profile.requires.gpu_names[0]
    ok, _ = gpu_matches(profile, (f"NVIDIA {wanted} (some memory size)",))
    assert ok
    other = "NVIDIA H200" if wanted != "H200" else "Tesla T4"
    ok, why = gpu_matches(profile, (other,))
    assert not ok and other in why and "another device" in why
    ok, why = gpu_matches(profile, ())
    assert not ok and "no NVIDIA GPU" in why


def test_a_provider_listed_but_not_loadable_is_told_apart():
    """onnxruntime-gpu lists TensorRT even where its libraries are missing; only a session says.
    On this machine's onnxruntime the CPU provider runs and a GPU provider does not."""
    assert provider_loads("CPUExecutionProvider")[0]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    ok, why = provider_loads("CUDAExecutionProvider")
    assert not ok and "falls back to ['CPUExecutionProvider']" in why, why
    assert "CUDAExecutionProvider" in why


@pytest.mark.skipif(bool(local_gpu_names()), reason="checks the refusal on a machine without a GPU")
def test_measure_is_refused_for_a_gpu_profile_this_machine_cannot_run(tmp_path):
    profile = load_profile("t4-gpu")
    ok, why = measurable_here(profile)
    assert not ok and "TensorrtExecutionProvider" in why
    with pytest.raises(ConfigError, match="--latency measure: profile 't4-gpu' cannot be measured"):
        run_search(SearchConfig(profile="t4-gpu", budget=1, latency="measure", runs_root=tmp_path))


def test_a_batch_size_setting_reaches_the_predicted_latency(tmp_path, task, quick_space):
    result = run_search(SearchConfig(profile="t4-gpu", budget=2, latency="predict", batch_size=8,
                                     runs_root=tmp_path, refine=0, space=quick_space),
                        show_progress=False)
    study = result.load_study()
    assert {t.user_attrs["latency_batch_size"] for t in study.trials
            if t.state.is_finished()} == {8}
    from search.latency.model import predict_latency
    from search.trial.compress import export_onnx

    # the same model predicted at the profile's own batch size, 1
    fp32 = export_onnx(task.teacher(), task.input_shape)
    fp32_1 = predict_latency(fp32, load_profile("t4-gpu"), task.input_shape).median_ms
    fp32_8 = float(result.trials.loc[result.trials["reference"], "latency_ms"].iloc[0])
    assert fp32_8 > 2 * fp32_1  # eight images cost more than one, even on a launch-bound GPU


@needs_tensorrt
def test_tensorrt_options_reach_the_session(task):
    from search.trial.compress import export_onnx

    model = export_onnx(task.teacher(), task.input_shape)
    profile = load_profile("t4-gpu")
    session = make_session(model, threads=1, provider=profile.measure.execution_provider,
                           fallback_providers=profile.measure.fallback_providers)
    options = session.get_provider_options()["TensorrtExecutionProvider"]
    assert options["trt_int8_enable"] == "1" and options["trt_fp16_enable"] == "1"
    assert options["trt_engine_cache_enable"] == "1"


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_cpu_path(fast_profile_path, monkeypatch, capsys):
    """The script's whole path on this CPU, run as ``python experiments/gpu_check.py`` runs it
    but in this process, on the session's Ray; measured with the suite's short-measurement
    profile of this host (the path, not the figures, is the subject)."""
    import runpy

    script = ROOT / "experiments" / "gpu_check.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--dry-run", "--models", "resnet18",
                                      "--profile", str(fast_profile_path)])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "measured here" in out and "resnet18" in out
    assert "gpu_check done" in out
