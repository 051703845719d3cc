"""How good is the front a study returns, and what did it cost? One study per seed, measured.

For each seed: run the study (README command 1's settings unless told otherwise), then
read what it left, selecting exactly as the product does, on validation only:

- the chosen point: the fastest trial within ``--drop`` points of fp32 on validation, by
  its speedup from the re-measurement after the study (interleaved round by round with
  the fp32 reference and uniform int8 in one task, 1 thread, batch 1 on CPU profiles);
  its speedup over fp32 with the range of the per-round ratios, over uniform int8;
- only then its test metric: the test drop against fp32, with a 95 % paired bootstrap
  interval over the test samples, and whether it stays within ``--drop`` on test; across
  seeds, how many chosen points miss it (the miss rate);
- the hypervolume (share of the box [ref - 10 points, ref] x [0, ref latency]) and the
  share of the trial loop's time at which the front first reached 90 % of it;
- wall time, and the share of trial time spent on trials that end dominated, stopped
  early, failed, or more than 10 points below the reference; the oracle floor of that
  share (what would be left if every trial that ends off the front had been stopped right
  after its screening: no stopping rule can do better at the same budget) and the
  excess over it. The floor keeps the front's trials whole *with their refinements*, so
  the excess is taken over the waste that counts every refinement with the trial it
  refined. That difference of shares grows with the front's share of the time (it is the
  time an oracle would save, as a share, times front / (screening + front)): a study that
  refines more reads as more wasteful. So the line also gives the excess in time: the
  share of all trial time that the oracle rule would have saved (``savable``: the
  fine-tunes of trials that end off the front).

    python experiments/front_benchmark.py --profile host --budget 20 --seeds 0 1 2
    python experiments/front_benchmark.py --profile host --budget 50 --arch resnet18 --seeds 0
    python experiments/front_benchmark.py --task signals --arch gru --budget 16 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import optuna
import pandas as pd

from search._base.attrs import StudyKey, TrialKey
from search._base.paths import model_path
from search.config import SearchConfig
from search.results.pareto import HV_ACCURACY_SPAN, chosen_point, hypervolume
from search.study.run import run_search
from search.tasks import TaskOptions, load_task


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
    beyond = 0.0  # and what they cost after it: what an oracle stopping rule would save
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
            screened = _screen_seconds(t)
            screening += screened
            beyond += max(_trial_seconds(t) - screened, 0.0)
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
    # the excess in time: the share of all trial time (refinements included) that the oracle
    # rule would have saved. Unlike ``wasted_refined - floor`` (which is this share times
    # front / (screening + front), so it grows as the front's refinements take more of the
    # study), it falls only when less is spent on fine-tunes that end off the front
    shares["savable"] = beyond / sum(refined.values()) if total else float("nan")
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


def _ratio_range(study: optuna.Study, slow: int, fast: int) -> tuple[float, float]:
    """The lowest and highest per-round ratio of trial ``slow``'s latency to ``fast``'s in
    the side-by-side re-measurement (rounds are interleaved, so round i of both ran under
    the same load)."""
    samples = study.user_attrs.get(StudyKey.REMEASURED, {})
    a = samples.get(str(slow), {}).get("samples_ms")
    b = samples.get(str(fast), {}).get("samples_ms")
    if not a or not b:
        return float("nan"), float("nan")
    ratios = [x / y for x, y in zip(a, b, strict=False)]
    return min(ratios), max(ratios)


def _chosen(study: optuna.Study, df: pd.DataFrame, drop: float) -> dict[str, float]:
    """The point the study reports (fastest within ``drop`` on validation, as the product
    selects: :func:`chosen_point`), its speedups with their per-round ranges, and its test
    drop. Test is read only here, after the choice."""
    ref = df[df["reference"]].iloc[0]
    best = chosen_point(df, drop)
    if best is None:
        return {}
    int8 = df[df["baseline"] == "int8"]
    column = "latency_remeasured_ms" if "latency_remeasured_ms" in df else "latency_ms"
    ref_ms, best_ms = float(ref[column]), float(best[column])
    out = {"trial": int(best["trial"]), "val": float(best["accuracy"]),
           "test": float(best["test_accuracy"]), "speedup": ref_ms / best_ms,
           "test_drop": float(ref["test_accuracy"] - best["test_accuracy"]),
           "val_drop": float(ref["accuracy"] - best["accuracy"]),
           "ref_val": float(ref["accuracy"]), "ref_test": float(ref["test_accuracy"])}
    out["speedup_lo"], out["speedup_hi"] = _ratio_range(study, int(ref["trial"]), out["trial"])
    out["vs_int8"] = float(int8[column].iloc[0]) / best_ms if len(int8) else float("nan")
    return out


def _bootstrap_drop(task, reference: bytes, chosen: bytes, split, rounds: int = 1000,  # noqa: ANN001
                    seed: int = 0) -> tuple[float, float]:
    """95 % paired bootstrap interval of the metric's drop (reference minus chosen) over
    the samples of ``split``: how far one eval set lets the drop be trusted."""
    import torch

    from search._base.ort import as_input, make_session
    from search.trial.compress.exact_int8 import exact_int8_twin, int8_saturates_here

    def outputs(model: bytes) -> torch.Tensor:  # scored as the product scores it
        model = exact_int8_twin(model) if int8_saturates_here() else model
        session = make_session(model, threads=1, spinning=False)
        return torch.from_numpy(session.run(None, {"input": as_input(split.x.numpy())})[0])

    a, b = outputs(reference), outputs(chosen)
    gen = torch.Generator().manual_seed(seed)
    drops = []
    for _ in range(rounds):
        idx = torch.randint(0, len(split.y), (len(split.y),), generator=gen)
        drops.append(task.metric(a[idx], split.y[idx]) - task.metric(b[idx], split.y[idx]))
    drops.sort()
    return float(drops[int(0.025 * rounds)]), float(drops[int(0.975 * rounds) - 1])


def _time_to_share(study: optuna.Study, df: pd.DataFrame, share: float = 0.9) -> float:
    """The share of the study's trial-loop time at which the front first reached ``share``
    of its final hypervolume (trials in the order they completed, refinements included)."""
    done = sorted((t for t in study.get_trials(deepcopy=False)
                   if t.state == optuna.trial.TrialState.COMPLETE and t.datetime_complete),
                  key=lambda t: t.datetime_complete)
    if not done:
        return float("nan")
    start = min(t.datetime_start for t in done if t.datetime_start)
    span = (done[-1].datetime_complete - start).total_seconds() or 1.0
    final = hypervolume(df)
    for k in range(1, len(done) + 1):
        numbers = {t.number for t in done[:k]}
        if hypervolume(df[df["trial"].isin(numbers)]) >= share * final:
            return (done[k - 1].datetime_complete - start).total_seconds() / span
    return 1.0


def study_row(config: SearchConfig, drop: float) -> dict:
    """Run the study ``config`` says and read what it left, as the module docstring says:
    the chosen point (on validation), its test drop with a bootstrap interval, speedups,
    hypervolume, time to 90 % of it, and the waste against its oracle floor."""
    result = run_search(config, show_progress=False)
    study = result.load_study()
    df = result.trials
    chosen = _chosen(study, df, drop)
    pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
    row = {"seed": config.seed, **chosen, "hypervolume": hypervolume(df), "wall_s": result.wall_s,
           "pruned": pruned, **_time_shares(study, df, drop),
           "trials_s": result.phases.get("trials", 0.0),
           "n_done": int(df["refined_from"].isna().sum()) + pruned,
           "refine_s": result.phases.get("refine", 0.0),
           "hv90": _time_to_share(study, df),
           "n_starts": sum(TrialKey.BASELINE in t.user_attrs or TrialKey.SEED_CONFIG in t.user_attrs
                           for t in study.get_trials(deepcopy=False))}
    # like with like: the floor keeps the front's refinements, so the waste it is compared
    # with counts every refinement with the trial it refined
    row["excess"] = row["wasted_refined"] - row["floor"]
    if chosen:
        task = load_task(config.task, config.seed, TaskOptions.of(config))
        reference = int(df.loc[df["reference"], "trial"].iloc[0])
        row["drop_lo"], row["drop_hi"] = _bootstrap_drop(
            task, model_path(result.output_dir, reference).read_bytes(),
            model_path(result.output_dir, chosen["trial"]).read_bytes(), task.test)
        row["test_samples"] = len(task.test.y)
    return row


def row_line(row: dict, drop: float) -> str:
    """One study's row as a sentence."""
    if "speedup" not in row:
        return f"seed {row['seed']}: no point within {drop:g} pt on validation"
    return (f"seed {row['seed']}: chosen on validation (fp32 {row['ref_val']:.2f} val, "
            f"{row['ref_test']:.2f} test): trial {row['trial']} at {row['val']:.2f} val / "
            f"{row['test']:.2f} test, test drop {row['test_drop']:+.2f} pt (95 % bootstrap "
            f"{row['drop_lo']:+.2f} to {row['drop_hi']:+.2f} over {row['test_samples']} test "
            f"samples), {'within' if row['test_drop'] <= drop + 1e-9 else 'MISSES'} "
            f"{drop:g} pt on test; {row['speedup']:.2f}x fp32 (rounds "
            f"{row['speedup_lo']:.2f}-{row['speedup_hi']:.2f}x), {row['vs_int8']:.2f}x "
            f"uniform int8; hypervolume {row['hypervolume']:.3f}, 90 % of it at "
            f"{100 * row['hv90']:.0f}% of the trial time; wall {row['wall_s']:.0f} s (refine "
            f"{row['refine_s']:.0f} s); {row['pruned']} stopped early; "
            f"{100 * row['wasted']:.0f}% of trial time wasted ({100 * row['wasted_refined']:.0f}% "
            f"with refinements), oracle floor {100 * row['floor']:.0f}%, excess "
            f"{100 * row['excess']:.0f} points; an oracle stopping rule would save "
            f"{100 * row['savable']:.0f}% of trial time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="host")
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", default="digits", help="a built-in task or module:function")
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
                              task=args.task,
                              space=args.space, runs_root=root, refine=args.refine,
                              early_stopping=not args.no_early_stopping,
                              study_name=f"bench-{args.task.replace(':', '.')}-{args.arch or 'default'}-"
                                         f"{args.profile}-s{seed}")
        rows.append(study_row(config, args.drop))
        print(row_line(rows[-1], args.drop), flush=True)
    chosen = [r for r in rows if "speedup" in r]
    if len(rows) > 1 and chosen:
        med = {k: statistics.median(r[k] for r in chosen) for k in
               ("speedup", "vs_int8", "test_drop", "hypervolume", "hv90", "wall_s", "wasted",
                "wasted_refined", "floor", "excess", "savable")}
        misses = sum(r["test_drop"] > args.drop + 1e-9 for r in chosen) + len(rows) - len(chosen)
        print(f"median of {len(rows)} seeds: {med['speedup']:.2f}x fp32 "
              f"({min(r['speedup'] for r in chosen):.2f}-{max(r['speedup'] for r in chosen):.2f}x), "
              f"{med['vs_int8']:.2f}x uniform int8, test drop {med['test_drop']:+.2f} pt; "
              f"{misses} of {len(rows)} chosen points miss {args.drop:g} pt on test (or none "
              f"was within it on validation); hypervolume {med['hypervolume']:.3f}, 90 % of it "
              f"at {100 * med['hv90']:.0f}% of the trial time; wall {med['wall_s']:.0f} s; "
              f"waste {100 * med['wasted']:.0f}% ({100 * med['wasted_refined']:.0f}% with "
              f"refinements), floor {100 * med['floor']:.0f}%, excess "
              f"{100 * med['excess']:.0f} points, oracle-savable {100 * med['savable']:.0f}%")
    print(f"studies under {root}")


if __name__ == "__main__":
    main()
