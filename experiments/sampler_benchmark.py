"""Search quality: each sampler's hypervolume at budget 50 as a share of a 200-trial reference.

Real studies (Optuna + Ray + PyTorch + ONNX Runtime + MLflow) on the default
task and the default space. Latency is *predicted* with the host profile's
calibrated model: a sampler comparison needs a deterministic objective, and
measured latencies on a shared machine move by 5-15 % between trials minutes
apart, more than the samplers differ. Accuracy is real (ONNX Runtime on the
validation split).

The reference front is one study continued to 200 trials (by default the
first sampler's first seed, so its first 50 trials are also one of the
budget-50 runs: Optuna resumes the same study). Hypervolume is
:func:`search.pareto.hypervolume`: the share of the box [reference accuracy -
10 pt, reference accuracy] x [0, reference latency] the front dominates.

Every study persists in --out, so a rerun resumes instead of recomputing.

    python experiments/sampler_benchmark.py --budget 50 --seeds 0 1 2 \\
        --samplers tpe random --extra-samplers nsga2 gp --reference-budget 200
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import optuna

from search.config import SearchConfig
from search.pareto import best_speedup, hypervolume, trials_frame
from search.study import run_search


def _study(args: argparse.Namespace, sampler: str, seed: int, budget: int) -> tuple[float, dict]:
    name = f"{sampler}-seed{seed}"
    config = SearchConfig(profile=args.profile, budget=budget, runs_root=args.out, seed=seed,
                          study_name=name, sampler=sampler, latency="predict",
                          parallel=args.parallel, space=args.space)
    start = time.perf_counter()
    run_search(config, show_progress=False)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=config.resolved(args.profile).storage)
    df = trials_frame(study)
    df = df[df["trial"].isin(sorted(df["trial"])[:budget])]  # the first `budget` completed
    return wall, {"sampler": sampler, "seed": seed, "budget": budget,
                  "hypervolume": hypervolume(df), "best_speedup_1pt": best_speedup(df, 1.0),
                  "front": int(df["on_front"].sum()), "cached": int(df["cached_from"].notna().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu-avx512-vnni")
    parser.add_argument("--space", default="default")
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--reference-budget", type=int, default=200)
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random"],
                        help="run before the reference; the first one's first seed is continued "
                             "to --reference-budget")
    parser.add_argument("--extra-samplers", nargs="*", default=["nsga2", "gp"],
                        help="run after the reference")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("search-runs/sampler-benchmark"))
    args = parser.parse_args()
    logging.getLogger("search").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []

    def run(sampler: str, seed: int) -> None:
        wall, row = _study(args, sampler, seed, args.budget)
        rows.append(row)
        print(f"{sampler:>7} seed {seed}: hypervolume {row['hypervolume']:.4f}, best speedup "
              f"within 1 pt {row['best_speedup_1pt'] or 0:.2f}x, front {row['front']}, "
              f"{row['cached']} cached ({wall:.0f} s)", flush=True)

    for seed in args.seeds:  # seed-major, so an interrupted run still compares samplers
        for sampler in args.samplers:
            run(sampler, seed)
    ref_sampler, ref_seed = args.samplers[0], args.seeds[0]
    wall, ref = _study(args, ref_sampler, ref_seed, args.reference_budget)
    print(f"reference: {ref_sampler} seed {ref_seed} continued to {args.reference_budget} trials: "
          f"hypervolume {ref['hypervolume']:.4f}, best speedup within 1 pt "
          f"{ref['best_speedup_1pt'] or 0:.2f}x ({wall:.0f} s more)", flush=True)
    for sampler in args.extra_samplers:
        for seed in args.seeds:
            run(sampler, seed)
    args.samplers += args.extra_samplers

    print(f"\n{'sampler':>8} {'seeds':>6} {'median HV':>10} {'share of ref':>13} {'min':>7} "
          f"{'max':>7}")
    medians = {}
    for sampler in args.samplers:
        shares = [r["hypervolume"] / ref["hypervolume"] for r in rows if r["sampler"] == sampler]
        hvs = [r["hypervolume"] for r in rows if r["sampler"] == sampler]
        medians[sampler] = statistics.median(shares)
        print(f"{sampler:>8} {len(shares):>6} {statistics.median(hvs):>10.4f} "
              f"{medians[sampler]:>12.1%} {min(shares):>7.1%} {max(shares):>7.1%}")
    default = "tpe"
    if default in medians:
        print(f"\ntarget: {default} >= 90% of the reference at budget {args.budget}: "
              f"{'met' if medians[default] >= 0.9 else 'NOT met'} ({medians[default]:.1%})")
        if "random" in medians:
            ratio = medians[default] / medians["random"] if medians["random"] else float("inf")
            print(f"target: {default} beats random on the median: "
                  f"{'met' if medians[default] > medians['random'] else 'NOT met'} "
                  f"(ratio {ratio:.2f})")
    (args.out / "results.json").write_text(json.dumps({"runs": rows, "reference": ref},
                                                      indent=1))


if __name__ == "__main__":
    main()
