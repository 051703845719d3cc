"""Measure latency with ONNX Runtime: warm up, repeat, report median, p90 and spread.

Numbers on a shared machine are noisy. Warm-up runs are discarded, runs repeat
until both a minimum count and a minimum time are reached, and the coefficient
of variation is kept so a noisy measurement can be spotted: it is repeated
once when it exceeds the profile's ``max_cv``, and flagged ``noisy`` when the
repeat is no better, so that a person reading the front knows which numbers
to distrust.
"""

from __future__ import annotations

import platform
import time
from dataclasses import replace

import numpy as np

from search._base.errors import TrialError
from search._base.ort import example_input, make_session
from search._base.records import LatencyStats
from search.profiles import HardwareProfile

__all__ = ["measure_latency", "summarize"]


def summarize(samples_s: list[float] | np.ndarray, *, device: str, provider: str,
              source: str = "measured") -> LatencyStats:
    """Robust statistics of run times given in seconds."""
    ms = np.asarray(samples_s, dtype=float) * 1e3
    if ms.size == 0 or not np.all(np.isfinite(ms)) or np.any(ms < 0):
        raise ValueError("latency samples must be a non-empty set of finite, non-negative times")
    mean = float(ms.mean())
    return LatencyStats(
        median_ms=float(np.median(ms)),
        p90_ms=float(np.percentile(ms, 90)),
        mean_ms=mean,
        cv=float(ms.std() / mean) if mean > 0 else 0.0,
        runs=int(ms.size),
        source=source,
        device=device,
        provider=provider,
    )


def _device_name(provider: str) -> str:
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        from search.profiles import local_gpu_names

        gpus = local_gpu_names()
        if gpus:
            return f"{gpus[0]} ({provider})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({provider})"


def _runner(session, feed: dict[str, np.ndarray], provider: str):  # noqa: ANN001, ANN202
    """One inference as a call. On a GPU provider inputs and outputs stay on the device
    (IOBinding), so host copies are not timed; the call returns once the device is done."""
    if provider in ("CPUExecutionProvider", "DnnlExecutionProvider", "OpenVINOExecutionProvider"):
        return lambda: session.run(None, feed)
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")
    return lambda: session.run_with_iobinding(binding)


def _timed_runs(run, settings) -> list[float]:  # noqa: ANN001
    for _ in range(settings.warmup_runs):
        run()
    samples: list[float] = []
    deadline = time.perf_counter() + settings.min_time_s
    while len(samples) < settings.min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
        if len(samples) > 100_000:
            break
    return samples


def measure_latency(model: bytes, profile: HardwareProfile,
                    input_shape: tuple[int, ...]) -> LatencyStats:
    """Measure ``model`` on this machine as ``profile`` says (provider, threads, batch)."""
    settings = profile.measure
    provider = settings.execution_provider
    try:
        session = make_session(model, threads=settings.threads, provider=provider,
                               provider_options=settings.provider_options,
                               fallback_providers=settings.fallback_providers)
    except Exception as exc:
        raise TrialError("measure", f"cannot create a {provider} session (nodes it cannot run "
                                    f"are refused, not moved to the CPU): {exc}") from exc
    if session.get_providers()[0] != provider:
        raise TrialError("measure", f"session fell back to {session.get_providers()}; "
                                    f"refusing to report it as {provider}")
    feed = {"input": example_input(session, (settings.batch_size, *input_shape))}
    run = _runner(session, feed, provider)
    stats = replace(summarize(_timed_runs(run, settings), device=_device_name(provider),
                              provider=provider), batch_size=settings.batch_size)
    if stats.cv > settings.max_cv:  # one retry: a burst of other work is common
        retry = summarize(_timed_runs(run, settings),
                          device=stats.device, provider=provider)
        stats = min(stats, retry, key=lambda s: s.cv)
    if stats.cv > settings.max_cv:
        stats = replace(stats, noisy=True)
    return stats
