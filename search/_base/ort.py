"""ONNX Runtime sessions, created the same way for scoring and for measuring."""

from __future__ import annotations

import contextlib
import functools
import io
import warnings

import numpy as np
import onnxruntime as ort

__all__ = ["as_input", "example_input", "make_session", "provider_loads"]


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
                "tensor(bool)": np.bool_}


def as_input(x: np.ndarray) -> np.ndarray:
    """Data as the exported model takes it: int64 token ids as they are, features float32."""
    return x if x.dtype == np.int64 else x.astype(np.float32)


def example_input(session: ort.InferenceSession, shape: tuple[int, ...]) -> np.ndarray:
    """An input of ``shape`` in the type the model declares: standard-normal floats for
    float inputs; zeros for integer ones (token ids: 0 is a valid index into any
    embedding, and the time a model takes does not depend on which ids it reads)."""
    kind = session.get_inputs()[0].type  # e.g. "tensor(float)", "tensor(int64)"
    dtype = np.dtype(_NUMPY_TYPES.get(kind, np.float32))
    if dtype.kind in "iub":
        return np.zeros(shape, dtype=dtype)
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32).astype(dtype)


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
    from search._base.paths import cache_dir

    defaults = {"trt_fp16_enable": "True", "trt_int8_enable": "True",
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(cache_dir() / "tensorrt-engines")}
    return {**defaults, **given}


@functools.cache
def provider_loads(provider: str) -> tuple[bool, str]:
    """Whether a session really runs on ``provider`` here, and why not.

    onnxruntime-gpu lists the TensorRT provider whether or not the TensorRT
    libraries can be loaded; without them a session falls back to CUDA (seen on
    an H100 with onnxruntime-gpu 1.31: ``libnvinfer.so.10: cannot open shared
    object file``), and a measuring session, which refuses the CPU, fails with
    an error about session options that names neither. A one-node session says
    which. Cached: a GPU provider takes seconds to start.
    """
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    printed = io.StringIO()  # ONNX Runtime prints why it fell back, and falls back
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            session = ort.InferenceSession(model.SerializeToString(), options,
                                           providers=[provider])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors have no common base
        return False, str(exc).splitlines()[0][:300]
    used = session.get_providers()
    if used and used[0] == provider:
        return True, f"a session runs on {provider}"
    causes = [line.split(" when using ")[0] for line in printed.getvalue().splitlines()
              if line.startswith("EP Error")] + [str(w.message).split(".Available")[0] for w in warned]
    cause = causes[0][:300] if causes else ""
    return False, f"a session on it falls back to {used}" + (f" ({cause})" if cause else "")
