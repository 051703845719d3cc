"""Where a trial's time goes, and trials per minute with --parallel 1 and 2.

Runs real studies (Optuna + Ray + MLflow + ONNX Runtime) in temporary
directories, one per --parallel value, side by side in one run. For each it
splits the trial loop's wall time into the stages each trial timed itself and
the rest (Ray scheduling and transfers, Optuna ask/tell, MLflow logging, model
files, waiting), which is orchestration. With trials in parallel, stage times
overlap, so orchestration is the loop's wall time times the parallelism minus
the summed stage time, an upper bound of what it costs.

    python experiments/trial_time_breakdown.py --budget 20 --parallel 1 2
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import optuna

from search._base.attrs import TrialKey
from search.config import SearchConfig
from search.study.run import run_search


def _one(args: argparse.Namespace, parallel: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = SearchConfig(profile=args.profile, budget=args.budget, runs_root=Path(tmp),
                              seed=args.seed, study_name="breakdown", parallel=parallel)
        result = run_search(config, show_progress=False)
        study = optuna.load_study(study_name="breakdown",
                                  storage=config.resolved(args.profile).storage)
        totals: dict[str, float] = {}
        for trial in study.trials:
            for stage, seconds in trial.user_attrs.get(TrialKey.TIMINGS, {}).items():
                totals[stage] = totals.get(stage, 0.0) + seconds
    loop = result.phases["trials"]
    n = max(1, len(result.trials) + result.n_failed)
    print(f"\n--parallel {parallel}: {args.budget} trials on {args.profile}: wall "
          f"{result.wall_s:.1f} s (setup {result.phases['setup']:.1f} s, trial loop {loop:.1f} s, "
          f"finish {result.phases['finish']:.1f} s); {60 * n / loop:.2f} trials/min in the loop")
    print(f"{'stage':<15}{'total s':>10}{'per trial s':>13}{'share':>9}")
    busy = loop * parallel
    for stage in ("prune", "train", "export", "quantize", "evaluate", "measure", "predict"):
        if stage in totals:
            print(f"{stage:<15}{totals[stage]:>10.2f}{totals[stage] / n:>13.3f}"
                  f"{totals[stage] / busy:>9.1%}")
    orchestration = busy - sum(totals.values())
    print(f"{'orchestration':<15}{orchestration:>10.2f}{orchestration / n:>13.3f}"
          f"{orchestration / busy:>9.1%}")
    best = f"{result.best_speedup:.2f}x" if result.best_speedup else "n/a"
    print(f"best speedup within 1 point: {best}; front size {int(result.front['on_front'].sum())}")
    return {"trials_per_min": 60 * n / loop, "orchestration": orchestration / busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--profile", default="cpu-avx512-vnni")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    logging.getLogger("search").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = {p: _one(args, p) for p in args.parallel}
    if len(results) > 1:
        base = results[args.parallel[0]]["trials_per_min"]
        print("\n" + ", ".join(f"--parallel {p}: {r['trials_per_min']:.2f} trials/min "
                                f"({r['trials_per_min'] / base:.2f}x)" for p, r in results.items()))


if __name__ == "__main__":
    main()
