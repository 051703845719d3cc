"""Validate the latency model: published T4 speedups and this host's measurements.

Table 1: NVIDIA's published TensorRT speedups on a Tesla T4 (fp16 and int8 over
fp32, batch 1 and 8: NVIDIA's TensorRT T4 speedup table, its numbers copied into
``PUBLISHED`` below) against the t4-gpu profile's prediction for the same
torchvision architectures (random weights; only shapes matter). The calibration
(efficiency per precision, op and session overheads) is fitted leave-one-model-out:
each model's cells are predicted by a calibration fitted on the other models' cells only.

Table 2: on this host (cpu-avx512-vnni, or cpu-avx2 without VNNI), predicted
against measured latency for compressed variants (structured ratio x precision
plan, plus unstructured sparsity) of four architectures (three CNNs and an
nn.TransformerEncoder), leave-one-variant-out and leave-one-architecture-out.

    python experiments/validate_latency_model.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision
from scipy.stats import spearmanr

from search._base.names import PRECISIONS
from search._base.records import Choices
from search.latency import (
    ARCHITECTURE_PRIOR,
    Calibration,
    LayerCost,
    costs_from_onnx,
    fit_calibration,
    fit_parameters,
    measure_latency,
    predict_ms,
)
from search.profiles import load_profile, measurable_here
from search.tasks import build_arch, load_task
from search.trial.compress import (
    apply_precision_plan,
    compressible_layers,
    export_onnx,
    onnx_node_names,
    prune_structured,
)
from search.trial.compress.heads import prune_heads
from search.trial.compress.prune import prune_unstructured
from search.trial.costs import costs_from_torch

# NVIDIA's published TensorRT speedups over fp32 on a Tesla T4: b1 fp16, b1 int8, b8 fp16, b8 int8
PUBLISHED = {
    "mobilenet_v2": (1.50, 1.90, 2.34, 3.98),
    "resnet50": (2.07, 3.52, 4.09, 7.25),
    "vgg16": (2.63, 2.71, 4.14, 6.44),
    "vgg19": (2.88, 3.09, 4.25, 6.95),
    "inception_v3": (2.38, 3.95, 3.76, 6.36),
    "resnext101_32x8d": (2.49, 3.55, 3.58, 6.26),
}
NOT_IN_TORCHVISION = ["MobileNet v1", "Inception v4"]
CELLS = [(1, "fp16"), (1, "int8"), (8, "fp16"), (8, "int8")]
# the precisions fitted on the T4 table: fp32 and those the cells compare with it
T4_PRECISIONS = [p for p in PRECISIONS if p == "fp32" or p in {q for _, q in CELLS}]
ARCHS = ("digits-resnet", "resnet18", "mobilenet_v2", "encoder")  # host table
# --more-archs adds layers of other shapes: VGG's weight-bound 3x3 convolutions on a 2x2 map
# (its pooling fitted to 32 px, as --arch builds it), an MLP's Gemms at batch 1
MORE_ARCHS = ("vgg11_bn", "mlp")


def _with_precision(costs: list[LayerCost], precision: str) -> list[LayerCost]:
    return [replace(c, precision=precision) for c in costs]


def _t4_costs() -> dict[str, dict[int, list[LayerCost]]]:
    out = {}
    for name in PUBLISHED:
        with torch.device("meta"):
            kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
            model = getattr(torchvision.models, name)(weights=None, **kwargs)
        size = 299 if name == "inception_v3" else 224
        out[name] = {b: costs_from_torch(model, (3, size, size), b, device="meta") for b in (1, 8)}
    return out


def _speedups(costs: dict[int, list[LayerCost]], profile, cal) -> list[float]:  # noqa: ANN001
    return [predict_ms(_with_precision(costs[b], "fp32"), profile, cal)
            / predict_ms(_with_precision(costs[b], p), profile, cal) for b, p in CELLS]


def _fit_speedups(models: list[str], costs, profile) -> Calibration:  # noqa: ANN001
    return fit_parameters(
        Calibration.of(profile.latency_model), T4_PRECISIONS,
        lambda cal: [math.log(pred / pub) for m in models
                     for pred, pub in zip(_speedups(costs[m], profile, cal), PUBLISHED[m],
                                          strict=True)],
        len(models) * 4, per_precision_overheads=False, memory=False,
        fill_keys=T4_PRECISIONS,
    )


def t4_table() -> None:
    profile = load_profile("t4-gpu")
    costs = _t4_costs()
    print("Table 1: T4 TensorRT speedup over fp32, published vs predicted "
          "(leave-one-model-out calibration)")
    print(f"{'model':<18}{'cell':<10}{'published':>10}{'predicted':>11}{'error':>8}"
          f"{'uncalibrated':>14}")
    errors, raw_errors = [], []
    for held_out in PUBLISHED:
        cal = _fit_speedups([m for m in PUBLISHED if m != held_out], costs, profile)
        predicted = _speedups(costs[held_out], profile, cal)
        raw = _speedups(costs[held_out], profile, None)
        for (b, p), pub, pred, r in zip(CELLS, PUBLISHED[held_out], predicted, raw, strict=True):
            err = pred / pub - 1
            errors.append(err)
            raw_errors.append(r / pub - 1)
            print(f"{held_out:<18}{f'b{b} {p}':<10}{pub:>10.2f}{pred:>11.2f}{err:>+8.0%}{r:>14.2f}")
    e = np.abs(errors)
    print(f"cells {len(e)}; within 25%: {int((e <= 0.25).sum())}/{len(e)}; median |error| "
          f"{np.median(e):.0%}; max {e.max():.0%} (uncalibrated median "
          f"{np.median(np.abs(raw_errors)):.0%})")
    print(f"not in torchvision, not scored: {', '.join(NOT_IN_TORCHVISION)}\n")


def _variants(arch: str, quick: bool, reduce_range: bool):  # noqa: ANN202
    task = load_task("digits", 0)
    if arch == "digits-resnet":
        make, shape = task.teacher, task.input_shape
    elif arch == "encoder":  # nn.TransformerEncoder: MatMul and attention, not Conv
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
        from examples.encoder_digits import EncoderDigits

        def make():  # noqa: ANN202
            torch.manual_seed(0)
            model = EncoderDigits().eval()
            prune_heads(model, 0.0, always=True)  # q/k/v/out as their own MatMuls, as a trial
            return model
        shape = task.input_shape
    elif arch == "mlp":
        def make():  # noqa: ANN202
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512),
                                       torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                       torch.nn.ReLU(), torch.nn.Linear(512, 10)).eval()
        shape = (1, 8, 8)
    elif arch == "vgg11_bn":
        def make():  # noqa: ANN202
            torch.manual_seed(0)
            return build_arch(arch, 10, 3, 32).eval()
        shape = (3, 32, 32)
    else:
        def make():  # noqa: ANN202
            torch.manual_seed(0)
            return getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
        shape = (3, 32, 32)
    calib = torch.randn(32, *shape)
    ratios = (0.0, 0.5) if quick else (0.0, 0.3, 0.5)
    for ratio in ratios:
        model = make()
        if ratio:
            prune_structured(model, torch.zeros(1, *shape), ratio, round_to=8)
        layers = compressible_layers(model)
        fp32 = export_onnx(model, shape)
        names = onnx_node_names(onnx.load_from_string(fp32), layers)
        plans = {"fp32": {x.name: "fp32" for x in layers},
                 "int8": {x.name: "int8" for x in layers}}
        mixed = dict(plans["int8"])
        mixed[layers[0].name] = mixed[layers[-1].name] = "fp32"
        plans["int8 first/last fp32"] = mixed
        for label, plan in plans.items():
            model_bytes = apply_precision_plan(fp32, plan, names, Choices(precisions=plan),
                                               calib, reduce_range=reduce_range)
            yield f"{arch} r{ratio:.1f} {label}", model_bytes, shape
    model = make()
    prune_unstructured(model, 0.7)
    yield f"{arch} 70% zeros fp32", export_onnx(model, shape), shape


def host_profile():  # noqa: ANN201
    """The built-in CPU profile this machine measures: VNNI if it has it, else AVX2."""
    for name in ("cpu-avx512-vnni", "cpu-avx2"):
        profile = load_profile(name)
        if measurable_here(profile)[0]:
            return profile
    raise SystemExit("this CPU has neither AVX-512 VNNI nor AVX2: no host table")


def host_rows(quick: bool, rounds: int = 3, archs: tuple[str, ...] = ARCHS) -> list[tuple]:
    """Every variant measured ``rounds`` times, round-robin, median of the rounds: on a shared
    machine a single measurement can be off by half, and interleaving spreads the
    disturbances over all variants alike."""
    profile = host_profile()
    variants = [(arch, label, model, shape) for arch in archs
                for label, model, shape in _variants(arch, quick, profile.int8.reduce_range)]
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(rounds):
        for i, (_, _, model, shape) in enumerate(variants):
            times[i].append(measure_latency(model, profile, shape).median_ms)
    return [(arch, label, model, float(np.median(t)), float(np.std(t) / np.mean(t)))
            for (arch, label, model, _), t in zip(variants, times, strict=True)]


def host_table(quick: bool, rounds: int = 3, save: str | None = None,
               load: str | None = None, archs: tuple[str, ...] = ARCHS) -> None:
    """Predicted against measured; ``save`` keeps the measurements (ONNX models and medians)
    so that ``load`` can refit and score another model of latency without measuring again."""
    import pickle

    profile = host_profile()
    if load:
        with open(load, "rb") as handle:
            rows = pickle.load(handle)  # noqa: S301 - a file this script wrote
    else:
        rows = host_rows(quick, rounds, archs)
    if save:
        with open(save, "wb") as handle:
            pickle.dump(rows, handle)
    rows = [(arch, label, costs_from_onnx(model, runtime_graph=True), ms, cv)
            for arch, label, model, ms, cv in rows]
    meas = np.array([r[3] for r in rows])

    def report(title: str, preds: list[float], subset: list[int] | None = None) -> None:
        measured = meas if subset is None else meas[subset]
        errors = np.abs(np.array(preds) / measured - 1)
        print(f"{title}: Spearman {spearmanr(preds, measured).statistic:.3f}; median |error| "
              f"{np.median(errors):.0%}; within 15%: {int((errors <= 0.15).sum())}/{len(preds)}, "
              f"20%: {int((errors <= 0.2).sum())}; max {errors.max():.0%}")

    # leave one variant out: each variant predicted by a calibration fitted on the other
    # variants of its architecture, as a study's self-calibration is (calibration.py fits per
    # architecture); and, for comparison, on the other variants of every architecture
    lovo = [predict_ms(costs, profile, fit_calibration(
        [(c, ms) for j, (a, _, c, ms, _) in enumerate(rows) if j != i and a == arch], profile,
        prior=ARCHITECTURE_PRIOR))
        for i, (arch, _, costs, _, _) in enumerate(rows)]
    pooled = [predict_ms(costs, profile, fit_calibration(
        [(c, ms) for j, (_, _, c, ms, _) in enumerate(rows) if j != i], profile))
        for i, (_, _, costs, _, _) in enumerate(rows)]
    # leave one architecture out: harder, the architecture was never measured
    def left_out(kept: set[str]) -> list[float]:
        return [predict_ms(costs, profile, fit_calibration(
            [(c, ms) for a, _, c, ms, _ in rows if a != arch and a in kept], profile))
            for arch, _, costs, _, _ in rows if arch in kept]

    loao = left_out({r[0] for r in rows})
    print(f"Table 2: {profile.name} (this host, 1 thread, batch 1), predicted vs measured ms")
    print(f"{'variant':<40}{'measured':>9}{'spread':>6}{'LOVO':>8}{'err':>6}{'LOAO':>8}{'err':>6}")
    for (_, label, _, ms, cv), a, b in zip(rows, lovo, loao, strict=True):
        print(f"{label:<40}{ms:>9.3f}{cv:>6.2f}{a:>8.3f}{a / ms - 1:>+6.0%}{b:>8.3f}"
              f"{b / ms - 1:>+6.0%}")
    report(f"{len(rows)} variants, leave-one-variant-out (fit on its architecture's others)",
           lovo)
    report("leave-one-variant-out, fit on every architecture's others", pooled)
    report("leave-one-architecture-out", loao)
    if {r[0] for r in rows} > set(ARCHS):  # the four the goal names, among themselves
        four = [i for i, r in enumerate(rows) if r[0] in ARCHS]
        report(f"leave-one-architecture-out among {', '.join(ARCHS)}", left_out(set(ARCHS)),
               four)
    report("uncalibrated profile numbers", [predict_ms(c, profile) for _, _, c, _, _ in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer host variants")
    parser.add_argument("--skip-host", action="store_true")
    parser.add_argument("--skip-t4", action="store_true")
    parser.add_argument("--rounds", type=int, default=3,
                        help="host measurements per variant, interleaved (median)")
    parser.add_argument("--save", help="keep the host measurements in this file")
    parser.add_argument("--load", help="score the model on measurements kept with --save")
    parser.add_argument("--more-archs", action="store_true",
                        help=f"measure {', '.join(MORE_ARCHS)} too (6 architectures)")
    args = parser.parse_args()
    start = time.perf_counter()
    if not args.skip_t4:
        t4_table()
    if not args.skip_host:
        host_table(args.quick, args.rounds, args.save, args.load,
                   ARCHS + MORE_ARCHS if args.more_archs else ARCHS)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
