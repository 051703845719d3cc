"""The GPU paths, checked on a machine with an NVIDIA GPU in one run (under 10 minutes).

After ``pip install -e '.[gpu]'`` (onnxruntime-gpu and the TensorRT libraries):

1. finds the GPU and the profile that describes it (T4, A100, H100);
2. measures fp32, fp16 and int8 (QDQ, explicit quantization in TensorRT) of a
   few torchvision models at batch 1, 8 and 128 with the profile's providers,
   and prints measured against predicted for that profile, with speedups over
   fp32 side by side;
3. runs a short measured study (``--latency measure``) and prints its front.

Where the profile's provider cannot run here (onnxruntime-gpu without the
TensorRT libraries, say), it says so and measures with the CUDA provider
alone, labelled as such: fp32 and fp16 rows, while its int8 rows fail (the CUDA
provider places a QDQ model's weight dequantizations on the CPU, which a
measurement refuses), and the study, which would refuse to measure, is skipped. So is the study where
Optuna, Ray or MLflow are not installed; the table needs only PyTorch, ONNX
and ONNX Runtime.

``--dry-run`` takes the same path on this machine's CPU (the host profile,
small inputs, batch 1 and 8, a budget-2 study): the CI runs it so the script
cannot rot while no GPU is at hand.

    python experiments/gpu_check.py
    python experiments/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
import torchvision

from search._base.ort import provider_loads
from search._base.records import Choices
from search.latency import measure_latency, predict_latency
from search.profiles import (
    HardwareProfile,
    available_profiles,
    gpu_matches,
    load_profile,
    local_gpu_names,
    measurable_here,
    with_batch_size,
)
from search.trial.compress import apply_precision_plan, compressible_layers, export_onnx, onnx_node_names
from search.trial.compress.heads import prune_heads


def _gpu_profile() -> str:
    names = local_gpu_names()
    for name in available_profiles():
        profile = load_profile(name)
        if profile.requires.gpu_names and gpu_matches(profile, names)[0]:
            return name
    sys.exit(f"no built-in profile describes this machine's GPU ({', '.join(names) or 'none'}); "
             "pass --profile, or --dry-run on a CPU machine")


def _variants(model: torch.nn.Module, shape: tuple[int, ...], precisions: list[str],
              profile: HardwareProfile) -> dict[str, bytes]:
    """Uniform variants, int8 in the mode the profile's kernels fuse (TensorRT: symmetric
    int8 activations; x86: uint8)."""
    prune_heads(model, 0.0, always=True)  # attention split into projections, as trials export it
    fp32 = export_onnx(model.eval(), shape)
    layers = compressible_layers(model)
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    calibration = torch.randn(64, *shape)
    int8 = profile.int8
    activation = (int8.fast_activation_types or int8.activation_types)[0]
    out = {}
    for precision in precisions:
        plan = {layer.name: precision for layer in layers}
        choices = Choices(precisions=plan, activation_type=activation,
                          weight_type=int8.weight_types[0], per_channel=int8.per_channel[0],
                          activation_symmetric=int8.activation_symmetric[0],
                          calibration_samples=32)
        out[precision] = fp32 if precision == "fp32" else apply_precision_plan(
            fp32, plan, names, choices, calibration, reduce_range=int8.reduce_range)
    return out


def _measured_as(profile: HardwareProfile) -> tuple[HardwareProfile, bool]:
    """The profile as it can be measured here, and whether that is with its own provider:
    where TensorRT cannot load on the right GPU, CUDA alone, said loudly."""
    ok, why = measurable_here(profile)
    print(f"profile {profile.name}: {'measured here' if ok else 'NOT measurable here'} ({why})")
    if ok:
        return profile, True
    cuda_ok, cuda_why = provider_loads("CUDAExecutionProvider")
    if (profile.measure.execution_provider != "TensorrtExecutionProvider" or not cuda_ok
            or not gpu_matches(profile, local_gpu_names())[0]):
        sys.exit(f"cannot measure {profile.name} here: {why}; CUDA: {cuda_why}")
    print("measuring with CUDAExecutionProvider alone: not the profile's provider; int8 QDQ "
          "models cannot run on it without the CPU, so their rows fail")
    return profile.model_copy(update={"measure": profile.measure.model_copy(update={
        "execution_provider": "CUDAExecutionProvider", "fallback_providers": []})}), False


def _table(base: HardwareProfile, models: list[str], side: int, batches: list[int]) -> None:
    precisions = [p for p in ("fp32", "fp16", "int8") if p in base.precisions_used()]
    shape = (3, side, side)
    print(f"{'model':<14} {'batch':>5} {'precision':>9} {'measured ms':>12} {'predicted ms':>13} "
          f"{'speedup meas.':>14} {'speedup pred.':>14}")
    for arch in models:
        model = getattr(torchvision.models, arch)(num_classes=10)
        try:
            variants = _variants(model, shape, precisions, base)
        except Exception as exc:  # noqa: BLE001 - one model that fails must not end the check
            print(f"{arch:<14} failed to export or quantize: {str(exc).splitlines()[0][:300]}")
            continue
        for batch in batches:
            profile = with_batch_size(base, batch)
            rows = {}
            for precision, onnx_model in variants.items():
                try:
                    stats = measure_latency(onnx_model, profile, shape)
                except Exception as exc:  # noqa: BLE001 - one failed cell must not end the check
                    print(f"{arch:<14} {batch:>5} {precision:>9} failed: "
                          f"{str(exc).splitlines()[0][:200]}", flush=True)
                    continue
                predicted = predict_latency(onnx_model, profile, shape).median_ms
                rows[precision] = (stats.median_ms, predicted, stats.cv)
            m0, p0, _ = rows.get("fp32", (float("nan"),) * 3)
            for precision, (m, p, cv) in rows.items():
                print(f"{arch:<14} {batch:>5} {precision:>9} {m:>12.3f} {p:>13.3f} "
                      f"{m0 / m:>13.2f}x {p0 / p:>13.2f}x  cv {cv:.2f}", flush=True)


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
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}), "
          f"torch {torch.__version__}, GPUs: {', '.join(local_gpu_names()) or 'none'}")
    measured, own_provider = _measured_as(load_profile(profile))
    _table(measured, args.models, side, batches)
    missing = [m for m in ("optuna", "ray", "mlflow") if importlib.util.find_spec(m) is None]
    if missing or not own_provider:
        why = (f"{', '.join(missing)} not installed" if missing
               else f"{load_profile(profile).measure.execution_provider} does not run here")
        print(f"\nstudy skipped: {why}\ngpu_check done in {time.perf_counter() - start:.0f} s")
        return
    from search.config import SearchConfig
    from search.study.run import run_search

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
