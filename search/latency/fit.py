"""Fitting the latency model's parameters to measured latencies (least squares).

``fit_calibration`` refits a profile's efficiencies and overheads so that the model's
predictions (model.py) match measured latencies; ``fit_parameters`` is the fit itself, for
any residuals of a ``Calibration`` (say, predicted against published speedups).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from search.latency.costing import COMPUTE_OPS, LayerCost
from search.latency.model import Calibration, predict_ms
from search.profiles import HardwareProfile

__all__ = ["ARCHITECTURE_PRIOR", "FIT_PRIOR", "fit_calibration", "fit_parameters"]

# Weight of the pull towards the starting calibration, per parameter, in log units against
# the log error of one measurement. Seven free parameters fitted on a few architectures
# explain each other's errors away (an int8 transformer's extra nodes became a dear int8
# kernel call, then every int8 CNN was predicted slower than fp32): on 40 measured variants
# of four architectures (experiments/validate_latency_model.py, 2-core Xeon with VNNI),
# 0.3 took leave-one-architecture-out from Spearman 0.665 / median error 41 % / worst 281 %
# to 0.732 / 26 % / 192 %, leave-one-variant-out unchanged (0.904 -> 0.913, median 20 %)
FIT_PRIOR = 0.3
# A fit for one architecture only ever predicts that architecture's variants, so it may move
# further from the profile's compromise across architectures. Leave-one-variant-out within
# each of six architectures (60 variants measured twice, hours apart, on that Xeon): 51 / 60
# within 15 % at 0.3 on both tables, 54 and 55 at 0.1, 54 and 52 at 0; fitted on 4 or 6
# random variants and predicting the rest, 0.1 was as good or better (73-82 % within 15 %
# against 69-78 %)
ARCHITECTURE_PRIOR = 0.1


def fit_calibration(samples: Iterable[tuple[list[LayerCost], float]], profile: HardwareProfile,
                    base: Calibration | None = None, prior: float = FIT_PRIOR,
                    weights: Iterable[float] | None = None) -> Calibration:
    """Refit efficiencies and overheads so predictions match measured latencies (ms).

    Least squares on log latency, so fast and slow models weigh alike, each
    parameter pulled towards ``base`` (the profile's numbers) with weight
    ``prior``: the fewer the measurements, the less they move it. ``weights``
    count a sample as that many (default one each).
    """
    samples = list(samples)
    weights = [1.0] * len(samples) if weights is None else list(weights)
    kept = [(c, ms, w) for (c, ms), w in zip(samples, weights, strict=True) if ms > 0]
    data = [(c, ms) for c, ms, _ in kept]
    root_w = [math.sqrt(w) for _, _, w in kept]
    settings = profile.latency_model
    if settings is None or len(data) < 3:
        return base or Calibration.of(settings) if settings else base  # type: ignore[return-value]
    start = base or Calibration.of(settings)
    used = sorted({c.precision for costs, _ in data for c in costs if c.op_type in COMPUTE_OPS})
    keys = [p for p in used if p in start.efficiency]
    keys = (["fp32"] if "fp32" in keys else []) + [p for p in keys if p != "fp32"]
    nodes = any(c.runtime_node for costs, _ in data for c in costs)
    return fit_parameters(start, keys, lambda cal: [
        w * math.log(predict_ms(costs, profile, cal) / ms)
        for (costs, ms), w in zip(data, root_w, strict=True)], len(data),
                          node_overhead=nodes, cache=start.cache_mb is not None, prior=prior)


def fit_parameters(start: Calibration, eff_keys: list[str],
                   residuals: Callable[[Calibration], list[float]], n: int, *,
                   per_precision_overheads: bool = True, memory: bool = True,
                   fill_keys: list[str] | None = None,
                   node_overhead: bool = False, cache: bool = False,
                   prior: float = 0.0) -> Calibration:
    """The calibration, starting from ``start``, that makes ``residuals`` least (bounded
    least squares); ``residuals`` maps a calibration to one residual per measurement (say,
    the log of predicted over measured latency), and ``n`` is kept as its ``fitted_on``.

    Fitted: compute and memory efficiency per precision, overheads. Parameters: efficiency
    of each precision in ``eff_keys``; with ``memory``, a memory efficiency of each (caches
    make small models read weights faster than DRAM; ONNX Runtime's int8 QLinearConv on a
    layer of few output pixels took ~130 us for 2.4 M weights against ~78 us for fp32, in
    per-node profiles of ResNet-18 on the 2-core Xeon); the op overhead and, for precisions other than the
    first, a multiplier on it (int8 kernels cost more per call on a CPU); the
    session overhead; with ``fill_keys``, the fill rows of those precisions
    (fitted where tables span batch sizes, kept from the profile otherwise); with
    ``node_overhead``, the overhead of a runtime node (samples costed from the executed
    graph); with ``cache``, the DRAM rate (``Calibration.bandwidth_gbps``; the cache's size is
    the device's, from the profile: fitted too, it traded against the memory efficiencies and
    put every activation of an unseen MobileNet in DRAM, 2.4-3.7x too slow).
    All in log space, bounded; ``prior`` > 0 adds ``prior x (log parameter - log
    start)`` per parameter to the residuals.
    """
    from scipy.optimize import least_squares

    k = len(eff_keys)
    m = k if memory else 0
    scaled_keys = eff_keys[1:] if per_precision_overheads else []
    fill_keys = fill_keys or []
    f0 = k + m + len(scaled_keys)
    n0 = f0 + len(fill_keys)  # where the node overhead sits, when fitted
    rate = node_overhead and start.node_scale is not None  # the nodes' per-element cost
    c0 = n0 + (1 if node_overhead else 0) + (1 if rate else 0)  # the DRAM rate, when fitted

    def unpack(theta: np.ndarray) -> Calibration:
        eff = dict(start.efficiency)
        eff.update({p: float(np.exp(v)) for p, v in zip(eff_keys, theta[:k], strict=True)})
        mem = dict(start.memory_efficiency)
        mem.update({p: float(np.exp(v)) for p, v in zip(eff_keys[:m], theta[k:k + m], strict=True)})
        scale = {p: float(np.exp(v)) for p, v in
                 zip(scaled_keys, theta[k + m:k + m + len(scaled_keys)], strict=True)}
        fill = dict(start.fill_rows)
        fill.update({p: float(np.exp(v)) for p, v in
                     zip(fill_keys, theta[f0:f0 + len(fill_keys)], strict=True)})
        node = float(np.exp(theta[n0])) if node_overhead else start.node_overhead_us
        node_rate = float(np.exp(theta[n0 + 1])) if rate else start.node_scale
        dram = float(np.exp(theta[c0])) if cache else start.dram_gbps
        return Calibration(eff, float(np.exp(theta[-2])), float(np.exp(theta[-1])), n, mem, scale,
                           fill, node, dram, start.cache_mb, node_rate)

    theta0 = np.log([start.efficiency[p] for p in eff_keys]
                    + [start.memory_efficiency.get(p, 1.0) for p in eff_keys[:m]]
                    + [start.overhead_scale.get(p, 1.0) for p in scaled_keys]
                    + [max(start.fill_rows.get(p, 1.0), 1e-2) for p in fill_keys]
                    + ([max(start.node_us(), 1e-2)] if node_overhead else [])
                    + ([start.node_scale] if rate else [])
                    + ([start.dram_gbps] if cache else [])
                    + [max(start.op_overhead_us, 1e-2), max(start.session_overhead_us, 1e-2)])
    mem_bounds = (0.1, 20.0)
    # efficiency may pass 1: a profile's peak is nominal for a class of device, and a 2-core
    # Zen 5 ran the digits ResNet's fp32 model at 0.25 TFLOPS against cpu-avx512-vnni's 0.19
    # (capped at 1, its per-architecture fits missed the unpruned variants by 15-25 %)
    max_efficiency = 5.0
    nodes = 1 if node_overhead else 0
    rates = 1 if rate else 0
    drams = 1 if cache else 0  # GB/s
    bounds = (np.log([1e-4] * k + [mem_bounds[0]] * m + [0.2] * len(scaled_keys)
                     + [1e-2] * len(fill_keys) + [1e-2] * nodes + [0.05] * rates + [1e-2] * drams
                     + [1e-2, 1e-2]),
              np.log([max_efficiency] * k + [mem_bounds[1]] * m + [20.0] * len(scaled_keys)
                     + [1e5] * len(fill_keys) + [1e4] * nodes + [20.0] * rates + [1e4] * drams
                     + [1e5, 1e5]))
    theta0 = np.clip(theta0, bounds[0] + 1e-9, bounds[1] - 1e-9)
    anchor = theta0.copy()

    def objective(theta: np.ndarray) -> np.ndarray:
        data = np.asarray(residuals(unpack(theta)))
        return np.concatenate([data, prior * (theta - anchor)]) if prior else data

    fit = least_squares(objective, theta0, bounds=bounds)
    return unpack(fit.x)
