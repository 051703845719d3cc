"""Hardware profiles: what a device can run and how to measure on it.

A profile is data (``hardware_profiles/*.yaml``) validated here and nowhere else.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from search._base.names import RUNNABLE_PRECISIONS, ActivationType, Precision, WeightType
from search._base.paths import builtin_dir
from search._base.schema import Strict, load_model, resolve_builtin

__all__ = [
    "HardwareProfile",
    "Int8Settings",
    "MeasureSettings",
    "PROFILES_DIR",
    "available_profiles",
    "host_cpu_flags",
    "gpu_matches",
    "host_profile",
    "load_profile",
    "local_gpu_names",
    "measurable_here",
    "with_batch_size",
]

PROFILES_DIR = builtin_dir("hardware_profiles")

OpType = Literal["Conv", "Gemm", "MatMul", "LSTM", "GRU"]
DeviceClass = Literal["cpu", "gpu", "fpga", "vpu", "gna", "npu"]


class Int8Settings(Strict):
    """How int8 layers may be quantized; each list is what the search may pick from.

    On x86 ONNX Runtime fuses QDQ into fast int8 kernels only with uint8
    activations (U8S8); int8 activations (S8S8) can be slower than fp32.
    """

    activation_types: list[ActivationType] = Field(default=["uint8"], min_length=1)
    # the activation types the device's int8 kernels fuse (fast); the others run but are slow.
    # None: all of them. A default space samples only these.
    fast_activation_types: list[ActivationType] | None = Field(
        default=None, min_length=1)
    weight_types: list[WeightType] = Field(default=["int8"], min_length=1)
    per_channel: list[bool] = Field(default=[True], min_length=1)
    activation_symmetric: list[bool] = Field(default=[False], min_length=1)
    # likewise for symmetric activation ranges: the ones its kernels run fast (None: all)
    fast_activation_symmetric: list[bool] | None = Field(default=None, min_length=1)
    reduce_range: bool = False

    @model_validator(mode="after")
    def _fast_within_runs(self) -> Int8Settings:
        for fast, runs in (("activation_types", self.activation_types),
                           ("activation_symmetric", self.activation_symmetric)):
            extra = sorted(set(getattr(self, f"fast_{fast}") or []) - set(runs))
            if extra:
                raise ValueError(f"fast_{fast} lists {extra}, which {fast} does not: {runs}")
        return self


class MeasureSettings(Strict):
    """How latency is measured: ONNX Runtime provider, threads, batch, repetitions."""

    execution_provider: str = "CPUExecutionProvider"
    provider_options: dict[str, str] = {}
    # providers after the first, for the nodes it cannot run (TensorRT, then CUDA); never the
    # CPU's, whose silent fallback would measure another device
    fallback_providers: list[str] = []
    threads: int = Field(default=1, ge=1, le=256)
    batch_size: int = Field(default=1, ge=1, le=4096)
    warmup_runs: int = Field(default=20, ge=0)
    min_runs: int = Field(default=100, ge=3)
    min_time_s: float = Field(default=1.0, ge=0.0, le=600.0)
    max_cv: float = Field(default=0.25, gt=0.0)
    # after the study, the baselines and the front are measured again in this many rounds,
    # each model once per round, interleaved: the speedups a user reads share their load
    side_by_side_rounds: int = Field(default=5, ge=1, le=100)


class LatencyModelSettings(Strict):
    """The numbers the latency model needs (search/latency/model.py).

    ``peak_tops``: dense tera-operations per second per precision (one MAC = two
    operations); ``efficiency``: the share of that peak real kernels reach, the
    calibration factors that measurements refit; ``fill_rows``: how many output
    rows (batch x output pixels, or batch x tokens) a Conv/Gemm of that precision
    needs to reach half its efficiency. Tensor-core tiles are large, so a layer
    with few rows (batch 1, late layers) leaves them part empty: that is why
    int8 gains far more over fp32 at batch 8 than at batch 1 on a GPU. Absent:
    no such penalty (CPU SIMD kernels fill at a few rows).
    """

    peak_tops: dict[Precision, float] = Field(min_length=1)
    memory_gbps: float = Field(gt=0)
    op_overhead_us: float = Field(default=5.0, ge=0)
    # per executed non-compute node (CPU provider profiles, whose executed graph is read);
    # absent: a quarter of op_overhead_us
    node_overhead_us: float | None = Field(default=None, ge=0)
    # and what they spend per element (the larger of in and out), by the op type ONNX
    # Runtime runs ("default" for the rest): a ReLU streams its tensor, an int8 softmax spends
    # ~3 ns an element; measured with tools/node_costs.py. Absent: memory traffic only
    node_ns_per_element: dict[str, float] = {}
    session_overhead_us: float = Field(default=20.0, ge=0)
    # a CPU's cache: a model whose weights fit in ``cache_mb`` reads them at memory_gbps
    # every run; the more they exceed it, the closer the rate falls to ``dram_gbps``
    cache_mb: float | None = Field(default=None, gt=0)
    dram_gbps: float | None = Field(default=None, gt=0)
    # precisions whose convolution kernels skip the taps that fall on zero padding (ONNX
    # Runtime's fp32 NCHWc kernels on CPU; its int8 im2col kernels compute them all): on
    # small maps a 3x3 convolution then does and reads a fraction of its MACs and weights
    skips_padding: list[Precision] = []
    efficiency: dict[Precision, float] = {}
    # the share of peak a depthwise convolution reaches, per precision (absent: ``efficiency``):
    # nine MACs an output leave SIMD lanes idle, and ONNX Runtime's int8 depthwise kernel is
    # ~3x slower than its fp32 one on one core (tools/node_costs.py)
    depthwise_efficiency: dict[Precision, float] = {}
    # precisions whose dense convolutions copy their input into columns first (im2col: the
    # input channels once per output pixel and kernel tap), and what one such copy costs
    im2col_ns_per_copy: dict[Precision, float] = {}
    # precisions whose convolution kernels work on channels in blocks of this many, padding
    # the rest with zeros (ONNX Runtime's fp32 NCHWc kernels: 16 channels with AVX-512, 8 with
    # AVX2): a 40-channel layer costs what a 48-channel one does. Absent: no such padding
    channel_block: dict[Precision, PositiveInt] = {}
    memory_efficiency: dict[Precision, float] = {}
    fill_rows: dict[Precision, float] = {}
    sources: str = ""

    @model_validator(mode="after")
    def _cache_needs_dram(self) -> LatencyModelSettings:
        if (self.cache_mb is None) != (self.dram_gbps is None):
            raise ValueError("cache_mb and dram_gbps go together: give both (the cache and "
                             "the DRAM bandwidth beyond it) or neither")
        return self

    @field_validator("fill_rows")
    @classmethod
    def _not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v >= 0}
        if bad:
            raise ValueError(f"must be numbers >= 0, got {bad}")
        return value

    @field_validator("peak_tops", "efficiency", "memory_efficiency")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"must be positive numbers, got {bad}")
        return value


class HostRequirements(Strict):
    """What the running machine must have for this profile to be measured on it."""

    cpu_flags: list[str] = []
    absent_cpu_flags: list[str] = []  # a newer CPU runs other kernels: not this device
    # the GPU models this profile describes (substrings of the name the driver reports, e.g.
    # "T4"): a host or node with another GPU does not measure it
    gpu_names: list[str] = []


class HardwareProfile(Strict):
    """A target device: allowed precisions per op type and how to measure it."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    device_class: DeviceClass
    description: str = ""
    precisions: dict[OpType, list[Precision]] = Field(min_length=1)
    int8: Int8Settings = Int8Settings()
    sparse_kernels: Literal["none", "2:4", "unstructured"] = "none"
    channel_multiple: int = Field(default=8, ge=1, le=256)
    measure: MeasureSettings = MeasureSettings()
    requires: HostRequirements = HostRequirements()
    resource: str | None = None
    legacy: str | None = None
    latency_model: LatencyModelSettings | None = None

    @field_validator("precisions")
    @classmethod
    def _fp32_or_something(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for op, allowed in value.items():
            if not allowed:
                raise ValueError(f"op type {op} allows no precision at all")
            cannot = [p for p in allowed if p not in RUNNABLE_PRECISIONS]
            if cannot:
                raise ValueError(
                    f"op type {op} lists {', '.join(cannot)}, which the trial pipeline cannot "
                    f"produce and score here; allowed: {', '.join(RUNNABLE_PRECISIONS)} (keep "
                    "the device's peak for it in latency_model, and leave it out of precisions)")
            if len(set(allowed)) != len(allowed):
                raise ValueError(f"op type {op} lists a precision twice: {allowed}")
        return value

    @model_validator(mode="after")
    def _default_resource(self) -> HardwareProfile:
        if self.resource is None:
            object.__setattr__(self, "resource", f"hw:{self.name}")
        if self.latency_model is not None:
            used = {p for allowed in self.precisions.values() for p in allowed}
            missing = sorted(used - set(self.latency_model.peak_tops))
            if missing:
                raise ValueError(
                    f"latency_model.peak_tops lacks {missing}, which precisions allows; "
                    "give a peak for every precision the device runs"
                )
        return self

    def precisions_used(self) -> list[str]:
        """Every precision some op type may run in."""
        return sorted({p for allowed in self.precisions.values() for p in allowed})

    def allowed(self, op_type: str) -> list[str]:
        """Precisions this device runs for ``op_type`` (fp32 only for unknown ops)."""
        return list(self.precisions.get(op_type, ["fp32"]))  # type: ignore[call-overload]


def available_profiles() -> list[str]:
    """Names of the built-in profiles (``host`` is detected from this machine)."""
    return sorted([p.stem for p in PROFILES_DIR.glob("*.yaml")] + ["host"])


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Load a built-in profile by name, or a user's profile from a YAML path."""
    text = str(name_or_path)
    if text == "host":
        return host_profile()
    path = resolve_builtin(text, PROFILES_DIR, "profile", available_profiles())
    return load_model(HardwareProfile, path)


@functools.cache
def host_cpu_flags() -> frozenset[str]:
    """CPU feature flags of this machine (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def measurable_here(profile: HardwareProfile) -> tuple[bool, str]:
    """Whether this machine can measure ``profile``, and why not if it cannot."""
    import onnxruntime as ort

    provider = profile.measure.execution_provider
    available = ort.get_available_providers()
    missing = [p for p in [provider, *profile.measure.fallback_providers] if p not in available]
    if missing:
        why = f"ONNX Runtime here lacks {', '.join(missing)}"
        if provider == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
            why += (" (CUDA alone cannot run int8 QDQ models on the GPU: their weights' "
                    "dequantizations are placed on the CPU)")
        return False, why
    if profile.device_class != "cpu":
        if provider == "CPUExecutionProvider":
            return False, f"a {profile.device_class} cannot be measured with the CPU provider"
        ok, why = gpu_matches(profile, local_gpu_names())
        if not ok:
            return ok, why
        from search._base.ort import provider_loads

        loads, load_why = provider_loads(provider)
        if not loads:
            why = f"ONNX Runtime here has {provider} but it cannot run: {load_why}"
            if provider == "TensorrtExecutionProvider":
                why += (" (the TensorRT libraries: pip install -e '.[gpu]'; CUDA alone cannot run "
                        "int8 QDQ models on the GPU)")
            return False, why
        return ok, why
    flags = host_cpu_flags()
    missing = sorted(set(profile.requires.cpu_flags) - flags)
    if missing:
        return False, f"this CPU lacks {', '.join(missing)}"
    newer = sorted(set(profile.requires.absent_cpu_flags) & flags)
    if newer:
        return False, (f"this CPU has {', '.join(newer)}, so ONNX Runtime would run other "
                       "kernels than the profiled device")
    return True, "this CPU has the required flags"


@functools.cache
def local_gpu_names() -> tuple[str, ...]:
    """The NVIDIA GPU models of this machine as the driver names them (none without one)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip())


def gpu_matches(profile: HardwareProfile, names: tuple[str, ...] | list[str]) -> tuple[bool, str]:
    """Whether one of the GPUs ``names`` is the device ``profile`` describes."""
    wanted = profile.requires.gpu_names
    if not wanted:
        return True, f"{profile.measure.execution_provider} available"
    if not names:
        return False, "no NVIDIA GPU found here"
    for name in names:
        if any(w.lower() in name.lower() for w in wanted):
            return True, f"{name} is a {'/'.join(wanted)}"
    return False, (f"this machine's GPU is {', '.join(names)}, not {'/'.join(wanted)}: its "
                   "latencies would describe another device")


def with_batch_size(profile: HardwareProfile, batch_size: int | None) -> HardwareProfile:
    """``profile`` measured and predicted at ``batch_size`` (a study setting) instead of its own."""
    if batch_size is None or batch_size == profile.measure.batch_size:
        return profile
    return profile.model_copy(update={
        "measure": profile.measure.model_copy(update={"batch_size": batch_size})})


def host_profile() -> HardwareProfile:
    """The running machine as a profile, detected from its CPU flags.

    The closest built-in CPU profile, renamed ``host``; a CPU with neither AVX2
    nor VNNI gets an fp32-only profile.
    """
    flags = host_cpu_flags()
    for name in ("cpu-avx512-vnni", "cpu-avx2"):
        base = load_profile(name)
        if measurable_here(base)[0]:
            return base.model_copy(update={
                "name": "host", "resource": "hw:host",
                "description": f"this machine, detected as {name}: {base.description}",
            })
    return HardwareProfile(
        name="host", device_class="cpu", resource="hw:host",
        description=f"this machine ({'x86' if 'sse2' in flags else 'unknown'} CPU without AVX2 "
                    "or VNNI): fp32 only, int8 is not expected to pay",
        precisions={"Conv": ["fp32"], "Gemm": ["fp32"], "MatMul": ["fp32"]},
    )
