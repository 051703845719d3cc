"""ONNX Runtime sessions, created the same way for scoring and for measuring."""

from __future__ import annotations

import onnxruntime as ort

__all__ = ["make_session"]


def make_session(model: bytes, *, threads: int, provider: str = "CPUExecutionProvider",
                 optimized_path: str | None = None) -> ort.InferenceSession:
    """A session with all graph optimizations, ``threads`` intra-op threads, sequential."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, options, providers=[provider])
