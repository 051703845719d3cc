"""Where a trial's time goes: train, export, quantize, evaluate, measure, orchestration.

Runs a real study (Optuna + Ray + MLflow + ONNX Runtime) in a temporary directory
and splits the wall time of its trial loop into the stages each trial timed
itself and the rest (Ray scheduling and transfers, Optuna ask/tell, MLflow
logging, model files), which is orchestration.

    python experiments/trial_time_breakdown.py --budget 20 [--profile cpu-avx512-vnni]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import optuna

from search.config import SearchConfig
from search.study import run_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--profile", default="cpu-avx512-vnni")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("search").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        config = SearchConfig(profile=args.profile, budget=args.budget, runs_root=Path(tmp),
                              seed=args.seed, study_name="breakdown")
        result = run_search(config, show_progress=False)
        study = optuna.load_study(study_name="breakdown", storage=config.resolved(
            args.profile).storage)
        totals: dict[str, float] = {}
        for trial in study.trials:
            for stage, seconds in trial.user_attrs.get("timings", {}).items():
                totals[stage] = totals.get(stage, 0.0) + seconds

    loop = result.phases["trials"]
    staged = sum(totals.values())
    rows = [(stage, totals[stage]) for stage in ("prune", "train", "export", "quantize",
                                                 "evaluate", "measure") if stage in totals]
    rows.append(("orchestration", loop - staged))
    n = max(1, len(result.trials) + result.n_failed)
    print(f"study of {args.budget} trials on {args.profile}: wall {result.wall_s:.1f} s "
          f"(setup {result.phases['setup']:.1f} s, trial loop {loop:.1f} s, "
          f"finish {result.phases['finish']:.1f} s)")
    print(f"{'stage':<15}{'total s':>10}{'per trial s':>13}{'share of loop':>15}")
    for stage, seconds in rows:
        print(f"{stage:<15}{seconds:>10.2f}{seconds / n:>13.3f}{seconds / loop:>14.1%}")
    print(f"best speedup within 1 point: {result.best_speedup:.2f}x; front size "
          f"{int(result.front['on_front'].sum())}")


if __name__ == "__main__":
    main()
