"""The GPU paths, checked on a machine with an NVIDIA GPU in one run (under 10 minutes).

After ``pip install -e '.[gpu]'`` (onnxruntime-gpu and the TensorRT libraries):

1. finds the GPU and the profile that describes it (T4, A100, H100);
2. measures fp32, fp16 and int8 (QDQ, explicit quantization in TensorRT) of a
   few torchvision models at batch 1, 8 and 128 with the profile's providers,
   and prints measured against predicted for that profile, with speedups over
   fp32 side by side;
3. runs a short measured study (``--latency measure``) and prints its front.

``--dry-run`` takes the same path on this machine's CPU (the host profile,
small inputs, batch 1 and 8, a budget-2 study): the CI runs it so the script
cannot rot while no GPU is at hand.

    python experiments/gpu_check.py
    python experiments/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
import torchvision

from search.compress import apply_precision_plan, compressible_layers, export_onnx, onnx_node_names
from search.config import SearchConfig
from search.latency import measure_latency
from search.latency.predict import predict_latency
from search.profiles import (
    available_profiles,
    load_profile,
    local_gpu_names,
    measurable_here,
    with_batch_size,
)
from search.record import Choices
from search.study import run_search


def _gpu_profile() -> str:
    names = local_gpu_names()
    for name in available_profiles():
        if name == "host":
            continue
        profile = load_profile(name)
        wanted = profile.requires.gpu_names
        if wanted and any(w.lower() in g.lower() for g in names for w in wanted):
            return name
    sys.exit(f"no built-in profile describes this machine's GPU ({', '.join(names) or 'none'}); "
             "pass --profile, or --dry-run on a CPU machine")


def _variants(model: torch.nn.Module, shape: tuple[int, ...], precisions: list[str],
              reduce_range: bool) -> dict[str, bytes]:
    fp32 = export_onnx(model.eval(), shape)
    layers = compressible_layers(model)
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    calibration = torch.randn(64, *shape)
    out = {}
    for precision in precisions:
        plan = {layer.name: precision for layer in layers}
        choices = Choices(precisions=plan, activation_type="int8", activation_symmetric=True,
                          calibration_samples=32)
        out[precision] = fp32 if precision == "fp32" else apply_precision_plan(
            fp32, plan, names, choices, calibration, reduce_range=reduce_range)
    return out


def _table(profile_name: str, models: list[str], side: int, batches: list[int]) -> None:
    base = load_profile(profile_name)
    precisions = [p for p in ("fp32", "fp16", "int8") if p in base.precisions_used()]
    shape = (3, side, side)
    print(f"{'model':<14} {'batch':>5} {'precision':>9} {'measured ms':>12} {'predicted ms':>13} "
          f"{'speedup meas.':>14} {'speedup pred.':>14}")
    for arch in models:
        model = getattr(torchvision.models, arch)(num_classes=10)
        variants = _variants(model, shape, precisions, base.int8.reduce_range)
        for batch in batches:
            profile = with_batch_size(base, batch)
            rows = {}
            for precision, onnx_model in variants.items():
                measured = measure_latency(onnx_model, profile, shape).median_ms
                predicted = predict_latency(onnx_model, profile, shape).median_ms
                rows[precision] = (measured, predicted)
            m0, p0 = rows["fp32"]
            for precision, (m, p) in rows.items():
                print(f"{arch:<14} {batch:>5} {precision:>9} {m:>12.3f} {p:>13.3f} "
                      f"{m0 / m:>13.2f}x {p0 / p:>13.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="default: the built-in profile of this GPU")
    parser.add_argument("--dry-run", action="store_true", help="the CPU path, small and quick")
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--budget", type=int, default=6)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.dry_run:
        profile, side, batches, budget, latency = args.profile or "host", 32, [1, 8], 2, "auto"
    else:
        profile, side, batches, budget, latency = (args.profile or _gpu_profile(), 224,
                                                   [1, 8, 128], args.budget, "measure")
    ok, why = measurable_here(load_profile(profile))
    print(f"profile {profile}: {'measured here' if ok else 'NOT measurable here'} ({why}); "
          f"GPUs: {', '.join(local_gpu_names()) or 'none'}")
    if not ok:
        sys.exit(f"cannot measure {profile} here: {why}")
    _table(profile, args.models, side, batches)
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    result = run_search(SearchConfig(profile=profile, budget=budget, latency=latency,
                                     batch_size=batches[-1], runs_root=root, refine=0,
                                     study_name=f"gpu-check-{load_profile(profile).name}"),
                        show_progress=False)
    print(f"\nstudy at batch {batches[-1]} ({result.wall_s:.0f} s, "
          f"{result.phases.get('trials', 0):.0f} s of trials):")
    cols = ["trial", "accuracy", "latency_ms", "latency_source", "device", "speedup",
            "precisions", "on_front", "baseline"]
    print(result.front[[c for c in cols if c in result.front.columns]].to_string(index=False))
    print(f"\ngpu_check done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
