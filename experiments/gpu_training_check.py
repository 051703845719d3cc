"""Training on the GPU vs the CPU: teacher training and whole trials of a small study.

For each device (``SEARCH_TRAIN_DEVICE=cuda``, then ``cpu``) it trains the
teacher from scratch (fresh cache) and runs a small study with predicted
latency, so the trial times are training, export, quantization and scoring
only, then prints seconds per trial and per stage side by side. Where there
is no CUDA it says so and exits 0.

    python experiments/gpu_training_check.py                  # digits + ResNet-18, budget 6
    python experiments/gpu_training_check.py --arch '' --budget 10   # the bundled DigitsResNet
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

from search._base.attrs import TrialKey
from search.config import SearchConfig
from search.study.run import run_search
from search.tasks import TaskOptions, load_task

_STAGES = ("prune", "train", "export", "quantize", "evaluate", "predict")


def _one(device: str, args: argparse.Namespace) -> dict[str, float]:
    os.environ["SEARCH_TRAIN_DEVICE"] = device
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SEARCH_CACHE_DIR"] = str(Path(tmp) / "cache")
        load_task.cache_clear()
        arch = args.arch or None
        start = time.perf_counter()
        task = load_task("digits", args.seed, TaskOptions(arch=arch, teacher_epochs=args.teacher_epochs))
        teacher_s = time.perf_counter() - start
        config = SearchConfig(profile=args.profile, budget=args.budget, runs_root=Path(tmp),
                              seed=args.seed, study_name=f"gpu-check-{device}", arch=arch,
                              teacher_epochs=args.teacher_epochs, latency="predict")
        result = run_search(config, show_progress=False)
        study = optuna.load_study(study_name=config.study_name,
                                  storage=config.resolved(args.profile).storage)
        n = max(1, len(result.trials))
        row = {"teacher_s": teacher_s, "teacher_acc": float(task.teacher_info["test_accuracy"]),
               "trial_s": result.phases["trials"] / n,
               "best_acc": float(result.trials["accuracy"].max())}
        for stage in _STAGES:
            row[stage] = sum(t.user_attrs.get(TrialKey.TIMINGS, {}).get(stage, 0.0)
                             for t in study.trials) / n
        choices = [t.params for t in study.trials]
        row["choices"] = hash(repr(choices))
        return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="torchvision arch; '' = DigitsResNet")
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--profile", default="cpu-avx512-vnni")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: nothing to compare (this check needs a GPU; CPU training is what the "
              "rest of the project already measures)")
        return 0
    logging.getLogger("search").setLevel(logging.WARNING)
    from search.trial.compress import distill

    if "search._base.devices" not in inspect.getsource(distill):
        print("note: search/compress/distill.py does not use search._base.devices yet, so trial "
              "fine-tuning runs on the CPU either way; teacher training uses the GPU")
    print(f"GPU: {torch.cuda.get_device_name(0)}; CPU threads: {torch.get_num_threads()}")
    rows = {device: _one(device, args) for device in ("cuda", "cpu")}
    print(f"\ndigits, arch {args.arch or 'DigitsResNet'}, teacher {args.teacher_epochs} epochs, "
          f"budget {args.budget} (latency predicted)")
    print(f"{'':<22}{'cuda':>10}{'cpu':>10}{'cpu/cuda':>10}")
    for key in ("teacher_s", "trial_s", *_STAGES):
        g, c = rows["cuda"][key], rows["cpu"][key]
        print(f"{key + (' (s)' if key != 'trial_s' else ' (s/trial)'):<22}{g:>10.2f}{c:>10.2f}"
              f"{(c / g if g else float('nan')):>10.2f}")
    for key in ("teacher_acc", "best_acc"):
        print(f"{key + ' (%)':<22}{rows['cuda'][key]:>10.2f}{rows['cpu'][key]:>10.2f}")
    same = rows["cuda"]["choices"] == rows["cpu"]["choices"]
    print(f"\nsame trial choices on both devices (seeded sampler): {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
