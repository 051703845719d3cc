"""How long a trial's fine-tune takes with the teacher's values kept, against the teacher run
in every batch, side by side in one run.

Distillation reads the teacher's outputs (and, for feature or relation losses, some of its
activations) on each training batch; in eval mode they do not change between epochs or
trials, so a worker computes them once per task and loss
(``search.trial.pipeline._teacher_outputs``). This times ``search.trial.pipeline.finetune`` (prune,
distil, export, quantize, score) of the same trials both ways, interleaved round by round,
and prints the medians and their ratio.

    python experiments/finetune_benchmark.py
    python experiments/finetune_benchmark.py --arch resnet18 --epochs 1 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import time

from search._base.records import Choices, TrialRecord
from search.profiles import load_profile
from search.tasks import TaskOptions, load_task
from search.trial import pipeline

_FORMS = {"unpruned": {}, "channels -50%": {"structured_ratio": 0.5},
          "channels -50%, 1 block dropped": {"structured_ratio": 0.5, "drop_blocks": 1}}


def _time(task, profile, choices: Choices, kept: bool) -> float:  # noqa: ANN001
    pipeline._TEACHER_OUTPUTS.clear()
    limit = pipeline._TEACHER_OUTPUTS_BYTES
    pipeline._TEACHER_OUTPUTS_BYTES = limit if kept else 0
    try:
        if kept:  # as in a worker that has fine-tuned a trial of this task before
            pipeline._teacher_outputs(task, choices.distill_loss)
        start = time.perf_counter()
        record = pipeline.finetune(TrialRecord(0, choices), task, profile)
        if record.error:
            raise SystemExit(record.error)
        return time.perf_counter() - start
    finally:
        pipeline._TEACHER_OUTPUTS_BYTES = limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--arch")
    parser.add_argument("--profile", default="cpu-avx512-vnni")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--losses", nargs="+", default=["response", "feature", "relation"])
    args = parser.parse_args()
    task = load_task(args.task, 0, TaskOptions(arch=args.arch))
    profile = load_profile(args.profile)
    for loss in args.losses:
        for label, form in _FORMS.items():
            choices = Choices(epochs=args.epochs, lr=3e-3, distill_loss=loss, **form)
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.rounds):
                for kept in (False, True):
                    times[kept].append(_time(task, profile, choices, kept))
            run, kept = statistics.median(times[False]), statistics.median(times[True])
            print(f"{loss:<9}{label:<32} teacher in every batch {run:6.2f} s  kept {kept:6.2f} s"
                  f"  {run / kept:.2f}x (spread {min(times[True]):.2f}-{max(times[True]):.2f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
