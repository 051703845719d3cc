"""How good is the front a study returns, and what did it cost? One study per seed, measured.

For each seed: run the study (README command 1's settings unless told
otherwise), then read what it left: the front re-measured after the study,
interleaved round by round with the fp32 reference and uniform int8 in one
task (1 thread, batch 1 on CPU profiles), so every ratio below was measured
side by side. Prints per seed and the median over seeds:

- best speedup over fp32 within ``--drop`` points of fp32's accuracy on both
  the validation and the test split, and that point's speed over uniform int8;
- the hypervolume (share of the box [ref - 10 points, ref] x [0, ref latency]);
- wall time, and the share of trial time spent on trials that end dominated,
  stopped early, failed, or more than 10 points below the reference (and
  that share split by how those trials ended);
- the oracle floor of that share: what would be left if every trial that ends
  off the front had been stopped right after its screening (no stopping rule
  can do better at the same budget).

    python experiments/front_benchmark.py --profile host --budget 20 --seeds 0 1 2
    python experiments/front_benchmark.py --profile host --budget 50 --arch resnet18 --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import optuna
import pandas as pd

from search._base.attrs import StudyKey, TrialKey
from search.config import SearchConfig
from search.results.pareto import HV_ACCURACY_SPAN, hypervolume
from search.study.run import run_search


def _trial_seconds(t: optuna.trial.FrozenTrial) -> float:
    return float(sum(t.user_attrs.get(TrialKey.TIMINGS, {}).values()))


def _time_shares(study: optuna.Study, df: pd.DataFrame, drop: float) -> dict[str, float]:
    """Shares of trial time (refinements not counted): on trials that end on the front within
    10 points of the reference (``front``), and wasted, split by how the trial ended:
    COMPLETE but dominated or far below (``dominated``), stopped early after screening or
    an epoch (``stopped``), or failed. ``wasted`` is the sum of the last three.

    Two more readings of the same time: ``near`` is the share of completed dominated trials
    within ``drop`` points of the screening front at their latency (a fine-tune cannot know
    in advance that it will end 0.3 points short), ``wasted_far`` the waste without them; and
    ``wasted_refined`` counts each refinement's time with the trial it refined (successive
    halving's last rung), refinements that were not adopted included."""
    reference = float(df.loc[df["reference"], "accuracy"].iloc[0])
    useful = set(df.loc[df["on_front"].fillna(False).astype(bool)
                        & (df["accuracy"] >= reference - HV_ACCURACY_SPAN), "trial"].astype(int))
    # a refinement on the front makes the trial it refined useful: that trial found it
    useful |= {int(t.user_attrs[TrialKey.REFINED_FROM]) for t in study.get_trials(deepcopy=False)
               if t.number in useful and TrialKey.REFINED_FROM in t.user_attrs}
    seconds = {"front": 0.0, "near": 0.0, "dominated": 0.0, "stopped": 0.0, "failed": 0.0}
    train = {"useful": 0.0, "wasted": 0.0}
    screening = 0.0  # what trials that end off the front cost up to their screening
    kinds: dict[int, str] = {}
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished() or TrialKey.REFINED_FROM in t.user_attrs:
            continue
        kind = ("front" if t.number in useful else
                "stopped" if t.state == optuna.trial.TrialState.PRUNED else
                "failed" if t.state == optuna.trial.TrialState.FAIL else
                "near" if _front_gap(df, t) <= drop else "dominated")
        kinds[t.number] = kind
        seconds[kind] += _trial_seconds(t)
        train["useful" if kind == "front" else "wasted"] += \
            t.user_attrs.get(TrialKey.TIMINGS, {}).get("train", 0.0)
        if kind != "front" and TrialKey.CACHED_FROM not in t.user_attrs:  # a cached trial cost nothing
            screening += _screen_seconds(t)
    total = sum(seconds.values())
    shares = {k: v / total if total else float("nan") for k, v in seconds.items()}
    shares["dominated"] += shares["near"]
    shares["wasted"] = 1.0 - shares["front"] if total else float("nan")
    shares["wasted_far"] = shares["wasted"] - shares["near"]
    shares["total_s"] = total
    # fine-tuning alone: what screening before training is there to save
    shares["train_wasted"] = train["wasted"] / sum(train.values()) if sum(train.values()) \
        else float("nan")
    refined = dict(seconds)
    for source, seconds_spent in study.user_attrs.get(StudyKey.REFINE_SECONDS, {}).items():
        refined[kinds.get(int(source), "front")] += float(seconds_spent)
    shares["wasted_refined"] = 1.0 - refined["front"] / sum(refined.values()) if total \
        else float("nan")
    # the oracle floor: every trial that ends off the front stopped right after screening
    # (its latency, and a one-shot trial's accuracy, are what any rule must pay to know where
    # it lands), the front's trials and their refinements kept whole; a goal below it cannot
    # be met by any stopping rule at this budget
    kept = screening + refined["front"]
    shares["floor"] = screening / kept if kept else float("nan")
    return shares


_SCREENING = ("prune", "export", "quantize", "measure", "predict")


def _screen_seconds(t: optuna.trial.FrozenTrial) -> float:
    """What a trial's screening took (``screen_seconds``; for studies from before that
    attribute, its stage timings, which also hold a fine-tune's own prune / export / quantize)."""
    if TrialKey.SCREEN_SECONDS in t.user_attrs:
        return float(t.user_attrs[TrialKey.SCREEN_SECONDS])
    timings = t.user_attrs.get(TrialKey.TIMINGS, {})
    return sum(timings.get(k, 0.0)
               for k in _SCREENING + (() if "train" in timings else ("evaluate",)))


def _front_gap(df: pd.DataFrame, t: optuna.trial.FrozenTrial) -> float:
    """How far below the best accuracy among trials at least as fast a completed trial ends,
    refinements left out (they had four times the fine-tune: a different fidelity)."""
    faster = df[(df["latency_ms"] <= t.values[1]) & df["refined_from"].isna()]
    return float(faster["accuracy"].max()) - t.values[0] if len(faster) else 0.0


def _best_within(df: pd.DataFrame, drop: float) -> tuple[pd.Series | None, float, float]:
    """The fastest trial within ``drop`` points on validation and test, its speedup over
    fp32 and over uniform int8, from the side-by-side re-measurement where there is one."""
    ref = df[df["reference"]].iloc[0]
    if "latency_remeasured_ms" in df:  # only what was measured side by side counts
        df = df[df["latency_remeasured_ms"].notna()].assign(
            latency_final=df["latency_remeasured_ms"])
    else:
        df = df.assign(latency_final=df["latency_ms"])
    ok = df[(df["accuracy"] >= ref["accuracy"] - drop)
            & (df["test_accuracy"] >= ref["test_accuracy"] - drop)]
    best = ok.sort_values("latency_final").iloc[0]
    int8 = df[df["baseline"] == "int8"]
    ref_ms = float(df.loc[df["reference"], "latency_final"].iloc[0])
    vs_int8 = float(int8["latency_final"].iloc[0]) / best["latency_final"] if len(int8) else float("nan")
    return best, ref_ms / best["latency_final"], vs_int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="host")
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arch")
    parser.add_argument("--space", default="default")
    parser.add_argument("--drop", type=float, default=1.0)
    parser.add_argument("--refine", type=int, default=4)
    parser.add_argument("--no-early-stopping", action="store_true")
    parser.add_argument("--runs-root", type=Path)
    args = parser.parse_args()
    root = args.runs_root or Path(tempfile.mkdtemp(prefix="front-benchmark-"))
    rows = []
    for seed in args.seeds:
        config = SearchConfig(profile=args.profile, budget=args.budget, seed=seed, arch=args.arch,
                              space=args.space, runs_root=root, refine=args.refine,
                              early_stopping=not args.no_early_stopping,
                              study_name=f"bench-{args.arch or 'digits'}-{args.profile}-s{seed}")
        result = run_search(config, show_progress=False)
        study = result.load_study()
        df = result.trials
        best, speedup, vs_int8 = _best_within(df, args.drop)
        pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
        row = {"seed": seed, "speedup": speedup, "vs_int8": vs_int8,
               "val": best["accuracy"], "test": best["test_accuracy"], "trial": int(best["trial"]),
               "hypervolume": hypervolume(df), "wall_s": result.wall_s,
               "pruned": pruned, **_time_shares(study, df, args.drop),
               "refine_s": result.phases.get("refine", 0.0)}
        rows.append(row)
        ref = df[df["reference"]].iloc[0]
        print(f"seed {seed}: best within {args.drop:g} pt (val {ref['accuracy']:.2f}, test "
              f"{ref['test_accuracy']:.2f} for fp32): trial {row['trial']} at {row['val']:.2f} / "
              f"{row['test']:.2f}, {speedup:.2f}x fp32, {vs_int8:.2f}x uniform int8; hypervolume "
              f"{row['hypervolume']:.3f}; wall {row['wall_s']:.0f} s (refine {row['refine_s']:.0f} "
              f"s); {pruned} trials stopped early; trial time {row['total_s']:.0f} s, "
              f"{100 * row['wasted']:.0f}% of it on trials that end off the front or > 10 points "
              f"below ({100 * row['dominated']:.0f}% completed dominated, of which "
              f"{100 * row['near']:.0f}% within {args.drop:g} pt of the front, "
              f"{100 * row['stopped']:.0f}% stopped early, {100 * row['failed']:.0f}% failed); "
              f"{100 * row['train_wasted']:.0f}% of fine-tuning time on such trials; "
              f"{100 * row['wasted_far']:.0f}% of trial time on trials ending more than "
              f"{args.drop:g} pt below the front; {100 * row['wasted_refined']:.0f}% wasted with "
              "refinements counted in the trials they refined; an oracle stopping every trial "
              f"off the front after its screening would still waste {100 * row['floor']:.0f}%",
              flush=True)
    if len(rows) > 1:
        med = {k: statistics.median(r[k] for r in rows) for k in
               ("speedup", "vs_int8", "hypervolume", "wall_s", "wasted", "train_wasted",
                "wasted_far", "wasted_refined", "floor")}
        print(f"median of {len(rows)} seeds: {med['speedup']:.2f}x fp32, {med['vs_int8']:.2f}x "
              f"uniform int8, hypervolume {med['hypervolume']:.3f}, wall {med['wall_s']:.0f} s, "
              f"{100 * med['wasted']:.0f}% of trial time and {100 * med['train_wasted']:.0f}% of "
              f"fine-tuning time wasted ({100 * med['wasted_far']:.0f}% on trials ending more "
              f"than {args.drop:g} pt below the front; {100 * med['wasted_refined']:.0f}% with "
              f"refinements counted in their trials; oracle floor {100 * med['floor']:.0f}%)")
    print(f"studies under {root}")


if __name__ == "__main__":
    main()
