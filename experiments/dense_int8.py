"""Uniform int8 of a detector or segmenter against fp32: the metric side by side, both
activation encodings (symmetric = scale only, asymmetric = scale and zero point), and the
latency ratio measured interleaved round by round.

The question the published int8 tables answer for Faster R-CNN (COCO mAP 0.38 fp32, 0.37
scale-only, 0.38 scale+shift): does post-training int8 keep a detector's mAP? Here on the
bundled tasks, with the product's own quantizer (ONNX Runtime QDQ, per-channel int8
weights, calibrated on the task's training images).

    python experiments/dense_int8.py --task digits-detection --rounds 7
    python experiments/dense_int8.py --task digits-segmentation
    python experiments/dense_int8.py --task digits-detection --qat-epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from search._base.records import Choices, TrialRecord
from search.latency import measure_latency
from search.profiles import load_profile
from search.tasks import TaskOptions, load_task
from search.tasks.detection import DetectionMetric
from search.trial.compress.exact_int8 import exact_int8_twin, int8_saturates_here
from search.trial.evaluate import onnx_score
from search.trial.pipeline import compress, student_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits-detection")
    parser.add_argument("--profile", default="cpu-avx512-vnni")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--qat-epochs", type=int, default=0,
                        help="also fine-tune each int8 encoding with fake quantization (QAT) "
                             "and response distillation for this many epochs")
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    args = parser.parse_args()
    profile = load_profile(args.profile)
    task = load_task(args.task, 0, TaskOptions())
    int8 = {layer.name: "int8" for layer in student_layers(task)}
    variants = {
        "fp32": Choices(),
        "int8 scale+shift (asymmetric)": Choices(precisions=int8, activation_symmetric=False,
                                                 calibration_samples=args.calibration_samples),
        "int8 scale only (symmetric)": Choices(precisions=int8, activation_symmetric=True,
                                               activation_type="int8",
                                               calibration_samples=args.calibration_samples),
    }
    if args.qat_epochs:
        for name in [n for n in variants if n.startswith("int8")]:
            variants[f"{name}, QAT {args.qat_epochs} epochs"] = dataclasses.replace(
                variants[name], qat=True, epochs=args.qat_epochs, lr=args.qat_lr)
    records = {name: compress(TrialRecord(i, c), task, profile, threads=2)
               for i, (name, c) in enumerate(variants.items())}
    extra = None
    if isinstance(task.metric, DetectionMetric):
        at50 = DetectionMetric(task.metric.decoder, iou="0.5")
        extra = ("mAP@.5 test", lambda r: onnx_score(
            exact_int8_twin(r.onnx_model) if int8_saturates_here() else r.onnx_model,
            task.test, at50, threads=2))
    rounds: dict[str, list[float]] = {name: [] for name in records}
    for _ in range(args.rounds):
        for name, r in records.items():
            rounds[name].append(measure_latency(r.onnx_model, profile, task.input_shape).median_ms)
    base = statistics.median(rounds["fp32"])
    ref = records["fp32"]
    print(f"{task.name} on {profile.name}, {args.rounds} interleaved rounds; {task.metric_name} "
          f"in points ({len(task.val)} val / {len(task.test)} test images)")
    header = f"| variant | {task.metric_name} val | {task.metric_name} test | drop test |"
    header += f" {extra[0]} |" if extra else ""
    print(header + " latency ms (median of rounds, range) | speedup |")
    for name, r in records.items():
        ms = statistics.median(rounds[name])
        cells = [name, f"{r.accuracy:.2f}", f"{r.test_accuracy:.2f}",
                 f"{ref.test_accuracy - r.test_accuracy:+.2f}"]
        if extra:
            cells.append(f"{extra[1](r):.2f}")
        cells += [f"{ms:.3f} ({min(rounds[name]):.3f}-{max(rounds[name]):.3f})", f"{base / ms:.2f}x"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
