"""Is there a front point faster than uniform int8 at no lower accuracy? Measured side by side.

Takes a finished study's output directory (trials.csv and models/), picks the
fp32 reference, the uniform-int8 baseline and every completed trial at least
as accurate as uniform int8 (validation split) that the study ranked faster,
then measures all of them on this machine, interleaved round by round
(reference, int8, candidates, reference, ...), with the profile's measurement
settings. Interleaving keeps load drift on a shared machine from favouring one
model; each round's median is kept and the table shows the median of rounds
and their spread.

    python experiments/front_vs_int8.py search-runs/sampler-benchmark/tpe-seed0 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd

from search._base.paths import model_path
from search.latency import measure_latency
from search.profiles import load_profile
from search.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--profile", default="cpu-avx512-vnni")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--top", type=int, default=6, help="candidates measured at most")
    parser.add_argument("--slack", type=float, default=0.0,
                        help="also take candidates up to this many points less accurate")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    shape = load_task("digits", 0).input_shape
    df = pd.read_csv(args.output_dir / "trials.csv")
    df = df[df["state"] == "COMPLETE"].fillna({"dropped_blocks": "-"})
    ref = df[df["reference"].astype(bool)].iloc[0]
    int8 = df[df["baseline"] == "int8"].iloc[0]
    better = df[(df["accuracy"] >= int8["accuracy"] - args.slack - 1e-9)
                & (df["latency_ms"] < int8["latency_ms"])
                & (df["trial"] != int8["trial"])]
    better = better.drop_duplicates("cached_from" if "cached_from" in better else "trial")
    candidates = better.sort_values("latency_ms").head(args.top)
    rows = [("fp32", ref), ("int8", int8)] + [(f"#{int(r['trial'])}", r)
                                              for _, r in candidates.iterrows()]
    models = {label: model_path(args.output_dir, int(r["trial"])).read_bytes()
              for label, r in rows}
    rounds: dict[str, list[float]] = {label: [] for label, _ in rows}
    for _ in range(args.rounds):
        for label, _ in rows:
            rounds[label].append(measure_latency(models[label], profile, shape).median_ms)
    base = statistics.median(rounds["fp32"])
    base8 = statistics.median(rounds["int8"])
    print(f"{len(candidates)} candidate(s) within {args.slack:g} pt of uniform int8 "
          f"({int8['accuracy']:.2f}% val) and faster by the study's {ref['latency_source']} "
          f"latency; measured here, {args.rounds} interleaved rounds, 1 thread, batch 1:")
    print(f"{'model':>6} {'val %':>7} {'test %':>7} {'median ms':>10} {'min-max ms':>15} "
          f"{'vs fp32':>8} {'vs int8':>8}  choices")
    for label, r in rows:
        ms = statistics.median(rounds[label])
        spread = f"{min(rounds[label]):.3f}-{max(rounds[label]):.3f}"
        what = (f"{r['precisions']}, structured {r.get('param.structured_ratio', 0):.2f}, "
                f"blocks dropped: {r.get('dropped_blocks', '-')}, "
                f"sparsity {r.get('sparsity', 0):.2f}, epochs {r.get('param.epochs', 0)}")
        print(f"{label:>6} {r['accuracy']:>7.2f} {r['test_accuracy']:>7.2f} {ms:>10.3f} "
              f"{spread:>15} {base / ms:>7.2f}x {base8 / ms:>7.2f}x  {what}")


if __name__ == "__main__":
    main()
