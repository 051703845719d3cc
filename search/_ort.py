"""ONNX Runtime sessions, created the same way for scoring and for measuring."""

from __future__ import annotations

import onnxruntime as ort

__all__ = ["make_session"]


def make_session(model: bytes, *, threads: int, provider: str = "CPUExecutionProvider",
                 provider_options: dict[str, str] | None = None,
                 optimized_path: str | None = None,
                 fallback_providers: list[str] | tuple[str, ...] = (),
                 spinning: bool = True) -> ort.InferenceSession:
    """A session with all graph optimizations, ``threads`` intra-op threads, sequential.

    For any provider but the CPU's, falling back to the CPU for unsupported
    nodes is disabled: session creation then fails instead of silently
    measuring the CPU (QLinearConv on CUDA is the classic case).
    ``spinning=False`` lets idle intra-op threads sleep: the same outputs, for
    scoring, where busy-waiting threads only take CPU from trials running beside
    it (measurement keeps ONNX Runtime's default, as deployments run it). Measured
    on this 2-core VM, two processes each scoring a digits model 15 times at batch
    256 at once: 4.4-5.2 s spinning, 3.9-4.0 s not; one process alone: no slower.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if provider != "CPUExecutionProvider":
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    providers = [(provider, _provider_options(provider, provider_options or {}))]
    providers += [(p, {}) for p in fallback_providers if p != "CPUExecutionProvider"]
    return ort.InferenceSession(model, options, providers=providers)


def _provider_options(provider: str, given: dict[str, str]) -> dict[str, str]:
    """TensorRT: explicit quantization from the QDQ graph with fp16 and int8 kernels allowed,
    and an engine cache so measuring the same model again does not rebuild its engine."""
    if provider != "TensorrtExecutionProvider":
        return dict(given)
    from search._paths import cache_dir

    defaults = {"trt_fp16_enable": "True", "trt_int8_enable": "True",
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(cache_dir() / "tensorrt-engines")}
    return {**defaults, **given}
