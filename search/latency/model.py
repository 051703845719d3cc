"""The roofline latency model: layer costs and a profile's numbers into milliseconds.

Each Conv/Gemm/MatMul costs ``max(compute time, memory time) + op overhead`` at
the precision it runs in, using the profile's peak throughput, its efficiency
(calibration) factor and memory bandwidth; compute slows where a layer has too
few output rows to fill the device's matrix tiles (``fill_rows``). A layer
whose input arrives in another precision pays a conversion pass over that input, so an
fp32 layer among int8 ones costs more than its own work.
Unstructured zeros only shrink compute where the profile has sparse kernels;
structured pruning shrinks the layers themselves, so it is seen directly.
Runtime nodes of the executed graph (costing.py) pay a node overhead and what their
kernel spends per element. A ``Calibration`` holds the profile's numbers as refitted
from measurements (fit.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from search._base.errors import ConfigError
from search._base.records import LatencyStats
from search.latency.costing import COMPUTE_OPS, LayerCost, costs_for
from search.latency.graph import BYTES
from search.profiles import HardwareProfile, LatencyModelSettings

__all__ = ["Calibration", "predict_latency", "predict_ms"]

# runtime ops whose table rate is for int8 data already; the others (a transpose, a pool on
# uint8 data) were timed on fp32 tensors and move a quarter of the bytes on int8 ones (an
# NCHW->NHWC transpose of uint8: 0.056 ns an element, of fp32 0.24)
_INT8_KERNELS = ("QLinear", "QuantizeLinear", "DequantizeLinear", "DynamicQuantize", "QGemm")


@dataclass(frozen=True)
class Calibration:
    """Multipliers on a profile's latency model, refit from measurements."""

    efficiency: dict[str, float]
    op_overhead_us: float
    session_overhead_us: float
    fitted_on: int = 0
    memory_efficiency: dict[str, float] = field(default_factory=dict)  # default 1.0
    overhead_scale: dict[str, float] = field(default_factory=dict)  # per precision, default 1.0
    fill_rows: dict[str, float] = field(default_factory=dict)  # per precision, default 0
    node_overhead_us: float | None = None  # per runtime node; None: a quarter op overhead
    dram_gbps: float | None = None  # with cache_mb: the rate for weights beyond the cache
    cache_mb: float | None = None
    node_scale: float | None = None  # on the profile's node_ns_per_element (None: it has none)

    @staticmethod
    def of(settings: LatencyModelSettings) -> Calibration:
        eff = {p: settings.efficiency.get(p, 0.5) for p in settings.peak_tops}
        mem = {p: settings.memory_efficiency.get(p, 1.0) for p in settings.peak_tops}
        return Calibration(eff, settings.op_overhead_us, settings.session_overhead_us,
                           memory_efficiency=mem, fill_rows=dict(settings.fill_rows),
                           node_overhead_us=settings.node_overhead_us,
                           dram_gbps=settings.dram_gbps, cache_mb=settings.cache_mb,
                           node_scale=1.0 if settings.node_ns_per_element else None)

    def bandwidth_gbps(self, settings: LatencyModelSettings, working_mb: float) -> float:
        """Memory rate for data of which ``working_mb`` are touched between two reads of it:
        the profile's rate where that fits the cache, falling towards DRAM's as it outgrows
        it. Weights are read once per run, so for them it is the whole model's weights
        (VGG-11's 67 MB fp32 4096x4096 Linear ran at 16 GB/s, 2.4 MB int8 layers of a
        ResNet-18 at 23 GB/s on the 2-core Xeon's profiled nodes); an activation is read
        right after it is written, so for it, its own size."""
        if self.cache_mb is None or self.dram_gbps is None:
            return settings.memory_gbps
        return self.dram_gbps + (settings.memory_gbps - self.dram_gbps) / (
            1.0 + working_mb / self.cache_mb)

    def node_us(self) -> float:
        return 0.25 * self.op_overhead_us if self.node_overhead_us is None \
            else self.node_overhead_us


def _channel_padding(c: LayerCost, block: int) -> float:
    """How much more work a conv does when its kernel pads channels to blocks of ``block``.

    Measured with ONNX Runtime's fp32 NCHWc kernels (1 thread, AVX-512, blocks of 16): 3x3
    convolutions 48->40, 40->48 and 48->48 channels at 16x16 all ran 48.4-48.8 us, 40-channel
    depthwise and 1x1 layers as long as 48-channel ones; a first convolution with fewer input
    channels than a block (1, 3 or 8) reads them unpadded."""
    if block <= 1 or not c.out_channels:
        return 1.0
    padded = math.ceil(c.out_channels / block) * block / c.out_channels
    if not c.depthwise and c.in_channels >= block:
        padded *= math.ceil(c.in_channels / block) * block / c.in_channels
    return padded


def predict_ms(costs: Iterable[LayerCost], profile: HardwareProfile,
               calibration: Calibration | None = None) -> float:
    """Predicted latency in milliseconds of the whole model on ``profile``."""
    settings = profile.latency_model
    if settings is None:
        raise ConfigError(f"profile {profile.name!r} has no latency_model, so latency cannot "
                          "be predicted for it; add one (see hardware_profiles/t4-gpu.yaml)")
    cal = calibration or Calibration.of(settings)
    costs = list(costs)
    weight_mb = sum(c.weight_elems * BYTES.get(c.precision, 4.0) for c in costs
                    if c.op_type in COMPUTE_OPS) / 1e6
    weight_rate = cal.bandwidth_gbps(settings, weight_mb) * 1e9
    bandwidth = settings.memory_gbps * 1e9

    def seconds(nbytes: float, rate: float | None = None) -> float:  # activations: own size
        return nbytes / (rate or cal.bandwidth_gbps(settings, nbytes / 1e6) * 1e9)

    total_us = cal.session_overhead_us
    for c in costs:
        b = BYTES.get(c.precision, 4.0)
        skip = c.op_type == "Conv" and c.precision in settings.skips_padding
        if c.moved_bytes is not None:
            memory_s = seconds(c.moved_bytes)
        else:
            memory_s = seconds(c.weight_elems * (c.taps_used if skip else 1.0) * b, weight_rate) \
                + seconds((c.in_elems + c.out_elems) * b)
        memory_s /= cal.memory_efficiency.get(c.precision, 1.0)
        if c.op_type in COMPUTE_OPS:
            precision = c.precision
            if c.activations_only and precision not in settings.peak_tops:
                precision = next(iter(settings.peak_tops))  # runs in what the device has
            peak = settings.peak_tops.get(precision)
            if peak is None:
                raise ConfigError(f"profile {profile.name!r} cannot run {c.precision} "
                                  f"({c.op_type} {c.name}); it runs {sorted(settings.peak_tops)}")
            work = 2.0 * c.macs * (c.on_input if skip else 1.0) * _channel_padding(
                c, settings.channel_block.get(c.precision, 0))
            if profile.sparse_kernels == "unstructured":
                work *= c.density
            elif profile.sparse_kernels == "2:4" and c.nm_sparse:
                work *= 0.5
            efficiency = cal.efficiency.get(precision, 0.5)
            if c.depthwise:
                efficiency = settings.depthwise_efficiency.get(precision, efficiency)
            compute_s = work / (peak * 1e12 * efficiency)
            fill = cal.fill_rows.get(precision, 0.0)
            if fill and c.macs and c.weight_elems:  # rows = MACs per weight: batch x pixels
                compute_s *= 1.0 + fill * c.weight_elems / c.macs
            overhead = cal.op_overhead_us * cal.overhead_scale.get(c.precision, 1.0)
            overhead += c.im2col_copies * settings.im2col_ns_per_copy.get(c.precision, 0.0) * 1e-3
            total_us += max(compute_s, memory_s) * 1e6 + overhead
            if c.input_precision is not None:  # a conversion pass at a precision boundary
                conv_bytes = c.in_elems * (b + BYTES.get(c.input_precision, 4.0))
                total_us += conv_bytes / bandwidth * 1e6 + cal.op_overhead_us
        elif c.runtime_node:
            if cal.node_scale is not None:  # what its kernel spends per element
                rates = settings.node_ns_per_element
                rate = rates.get(c.op_type, rates.get("default", 0.0))
                if c.precision == "int8" and not c.op_type.startswith(_INT8_KERNELS):
                    rate /= 4.0  # a byte moved where the table's fp32 op moved four
                memory_s = max(memory_s, max(c.in_elems, c.out_elems) * rate * cal.node_scale
                               * 1e-9)
            total_us += memory_s * 1e6 + cal.node_us()
        else:
            total_us += memory_s * 1e6 + 0.25 * cal.op_overhead_us * cal.overhead_scale.get(
                c.precision, 1.0)
    return total_us / 1e3


def predict_latency(model: bytes, profile: HardwareProfile, input_shape: tuple[int, ...],
                    calibration: Calibration | None = None) -> LatencyStats:
    """A LatencyStats labelled ``predicted`` for the profile's device and batch size."""
    ms = predict_ms(costs_for(model, profile), profile, calibration)
    return LatencyStats(median_ms=ms, p90_ms=ms, mean_ms=ms, cv=0.0, runs=0, source="predicted",
                        device=f"{profile.name} (latency model)", provider="",
                        batch_size=profile.measure.batch_size)
