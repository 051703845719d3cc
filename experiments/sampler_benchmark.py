"""Search quality: each sampler's hypervolume at budget 50 as a share of a 200-trial reference.

Real studies (Optuna + Ray + PyTorch + ONNX Runtime + MLflow) on the default
task and the default space. Latency is *predicted* with the host profile's
calibrated model: a sampler comparison needs a deterministic objective, and
measured latencies on a shared machine move by 5-15 % between trials minutes
apart, more than the samplers differ. Accuracy is real (ONNX Runtime on the
validation split).

The reference front is the union of every trial of every study this run
holds: the budget-50 runs, and --reference-budget-trial studies with each of
--reference-samplers (by default 200 trials each of TPE, NSGA-II and random
search): the best front this benchmark knows, whatever sampler found each
point (``--reference-samplers`` with no names: the budget runs alone).
Hypervolume is :func:`search.results.pareto.hypervolume`: the share of the box
[reference accuracy - 10 pt, reference accuracy] x [0, reference latency] the
front dominates. A budget-50 study is scored on all it returns: its first 50
trials and the refinement of its front.

Every study persists in --out, so a rerun resumes instead of recomputing.

    python experiments/sampler_benchmark.py --budget 50 --seeds 0 1 2 3 4 \\
        --samplers tpe random --reference-samplers tpe nsga2 random --reference-budget 200
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import optuna
import pandas as pd

from search.config import SearchConfig
from search.results.pareto import best_speedup, hypervolume, mark_front, trials_frame
from search.study.run import run_search


def _study(args: argparse.Namespace, sampler: str, seed: int, budget: int,
           prefix: str = "") -> tuple[float, pd.DataFrame]:
    name = f"{prefix}{sampler}-seed{seed}"
    config = SearchConfig(profile=args.profile, budget=budget, runs_root=args.out, seed=seed,
                          study_name=name, sampler=sampler, latency="predict",
                          parallel=args.parallel, space=args.space)
    start = time.perf_counter()
    run_search(config, show_progress=False)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=config.resolved(args.profile).storage)
    return wall, trials_frame(study)


def _row(sampler: str, seed: int, df: pd.DataFrame) -> dict:
    return {"sampler": sampler, "seed": seed, "hypervolume": hypervolume(df),
            "best_speedup_1pt": best_speedup(df, 1.0), "front": int(df["on_front"].sum()),
            "trials": len(df), "cached": int(df["cached_from"].notna().sum())}


def _union(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Every trial of several studies of one task, with one reference row (each study's
    fp32 reference is the same model, predicted the same), its front recomputed."""
    first = frames[0]
    return mark_front(pd.concat([first] + [f[~f["reference"]] for f in frames[1:]],
                                ignore_index=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu-avx512-vnni")
    parser.add_argument("--space", default="default")
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--reference-budget", type=int, default=200)
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random"])
    parser.add_argument("--reference-samplers", nargs="*", default=["tpe", "nsga2", "random"],
                        help="one --reference-budget study each (seed 0); the reference front "
                             "is the union of all their trials")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("search-runs/sampler-benchmark"))
    args = parser.parse_args()
    logging.getLogger("search").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)

    rows, frames = [], []
    for seed in args.seeds:  # seed-major, so an interrupted run still compares samplers
        for sampler in args.samplers:
            wall, df = _study(args, sampler, seed, args.budget)
            frames.append(df)
            rows.append(_row(sampler, seed, df))
            print(f"{sampler:>7} seed {seed}: hypervolume {rows[-1]['hypervolume']:.4f}, best "
                  f"speedup within 1 pt {rows[-1]['best_speedup_1pt'] or 0:.2f}x, front "
                  f"{rows[-1]['front']} of {len(df)} trials ({wall:.0f} s)", flush=True)
    for sampler in args.reference_samplers:
        wall, df = _study(args, sampler, 0, args.reference_budget, prefix="reference-")
        frames.append(df)
        print(f"reference study {sampler}, {args.reference_budget} trials: hypervolume "
              f"{hypervolume(df):.4f} ({wall:.0f} s)", flush=True)
    ref = _row("union", 0, _union(frames))
    print(f"reference: union of {sum(len(f) for f in frames)} trials: hypervolume "
          f"{ref['hypervolume']:.4f}, front {ref['front']}, best speedup within 1 pt "
          f"{ref['best_speedup_1pt'] or 0:.2f}x", flush=True)

    print(f"\n{'sampler':>8} {'seeds':>6} {'median HV':>10} {'share of ref':>13} {'min':>7} "
          f"{'max':>7}")
    medians = {}
    for sampler in args.samplers:
        shares = [r["hypervolume"] / ref["hypervolume"] for r in rows if r["sampler"] == sampler]
        hvs = [r["hypervolume"] for r in rows if r["sampler"] == sampler]
        medians[sampler] = statistics.median(shares)
        print(f"{sampler:>8} {len(shares):>6} {statistics.median(hvs):>10.4f} "
              f"{medians[sampler]:>12.1%} {min(shares):>7.1%} {max(shares):>7.1%}")
    default = SearchConfig(profile=args.profile, budget=args.budget).sampler
    if default in medians:
        print(f"\ntarget: {default} >= 95% of the reference at budget {args.budget}: "
              f"{'met' if medians[default] >= 0.95 else 'NOT met'} ({medians[default]:.1%})")
        if "random" in medians:
            ratio = medians[default] / medians["random"] if medians["random"] else float("inf")
            print(f"target: {default} beats random on the median: "
                  f"{'met' if medians[default] > medians['random'] else 'NOT met'} "
                  f"(ratio {ratio:.2f})")
    (args.out / "results.json").write_text(json.dumps({"runs": rows, "reference": ref},
                                                      indent=1))


if __name__ == "__main__":
    main()
