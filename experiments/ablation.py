"""Which parts of the search earn their place? The default study against four ablations, at
the same wall time, on several model families, several seeds each.

Per family and seed the default study runs first (the product's defaults, ``--budget``
trials); each ablation then gets the same wall time for its trial loop (``--time-limit``,
with a budget it cannot reach in that time), and its own refinement as the default's:

- ``default``: the product as shipped;
- ``starts``: only the baselines and the enqueued starting points (as many trials as the
  default study had of them), then the refinement: what the sampled trials add;
- ``no-early-stopping``: every fine-tune runs to its end;
- ``no-refinement``: ``--refine 0``, its trial loop given the default's refinement time too;
- ``random``: random sampling instead of TPE.

Each study is read as ``front_benchmark.py`` reads it, selecting on validation only: the
fastest point within ``--drop`` of fp32 (its side-by-side speedup), its test drop, the
hypervolume, the share of trial time at which 90 % of it was reached, and the waste with
its oracle floor. The table gives the median over seeds with the range.

    python experiments/ablation.py --profile host --budget 20 --seeds 0 1 2 \\
        --families digits digits/mobilenet_v2 signals/transformer
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

from front_benchmark import study_row

from search.config import SearchConfig

VARIANTS = ("default", "starts", "no-early-stopping", "no-refinement", "random")


def _variant(base: SearchConfig, name: str, default: dict) -> SearchConfig:
    """``base`` changed as ablation ``name`` says, timed against the default's ``row``."""
    loop = default["trials_s"]
    change: dict = {"time_limit_s": loop, "budget": 10 * base.budget}
    if name == "starts":
        change = {"budget": default["n_starts"]}
    elif name == "no-early-stopping":
        change["early_stopping"] = False
    elif name == "no-refinement":
        change.update(refine=0, time_limit_s=loop + default["refine_s"])
    elif name == "random":
        change["sampler"] = "random"
    return dataclasses.replace(base, study_name=f"{base.study_name}-{name}", **change)


def _median_range(values: list[float], fmt: str) -> str:
    values = [v for v in values if v == v]  # no NaN
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="host")
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=["digits"],
                        help="task or task/arch, e.g. digits/mobilenet_v2")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--drop", type=float, default=1.0)
    parser.add_argument("--runs-root", type=Path)
    args = parser.parse_args()
    root = args.runs_root or Path(tempfile.mkdtemp(prefix="ablation-"))
    table: dict[tuple[str, str], list[dict]] = {}
    for family in args.families:
        task, _, arch = family.partition("/")
        for seed in args.seeds:
            base = SearchConfig(profile=args.profile, budget=args.budget, seed=seed, task=task,
                                arch=arch or None, runs_root=root,
                                study_name=f"ablation-{task}-{arch or 'default'}-s{seed}")
            default = study_row(base, args.drop)
            table.setdefault((family, "default"), []).append(default)
            print(f"{family} default: " + _line(default, args.drop), flush=True)
            for name in args.variants:
                if name == "default":
                    continue
                row = study_row(_variant(base, name, default), args.drop)
                table.setdefault((family, name), []).append(row)
                print(f"{family} {name}: " + _line(row, args.drop), flush=True)
    print(f"\nmedian (range) over seeds {' '.join(map(str, args.seeds))}; budget {args.budget}; "
          f"profile {args.profile}; selection on validation within {args.drop:g} point(s)\n")
    print("| family | variant | best within drop, x fp32 | test drop | misses on test | "
          "hypervolume | 90 % of it at | trials | wall s | waste / floor / excess % | oracle-savable % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (family, name), rows in table.items():
        misses = sum("speedup" not in r or r["test_drop"] > args.drop + 1e-9 for r in rows)
        cells = [family, name,
                 _median_range([r.get("speedup", 1.0) for r in rows], ".2f"),
                 _median_range([r.get("test_drop", float("nan")) for r in rows], "+.2f"),
                 f"{misses} of {len(rows)}",
                 _median_range([r["hypervolume"] for r in rows], ".3f"),
                 _median_range([100 * r["hv90"] for r in rows], ".0f"),
                 _median_range([r["n_done"] for r in rows], ".0f"),
                 _median_range([r["wall_s"] for r in rows], ".0f"),
                 " / ".join(_median_range([100 * r[k] for r in rows], ".0f")
                            for k in ("wasted", "floor", "excess")),
                 _median_range([100 * r["savable"] for r in rows], ".0f")]
        print("| " + " | ".join(cells) + " |")
    print(f"studies under {root}")


def _line(row: dict, drop: float) -> str:
    speed = f"{row['speedup']:.2f}x" if "speedup" in row else f"nothing within {drop:g}"
    return (f"seed {row['seed']}: {speed}, hypervolume {row['hypervolume']:.3f}, "
            f"{row['n_done']} trials, wall {row['wall_s']:.0f} s, waste {100 * row['wasted']:.0f}% "
            f"(floor {100 * row['floor']:.0f}%)")


if __name__ == "__main__":
    main()
