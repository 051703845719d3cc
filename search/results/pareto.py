"""The study's results as tables: every trial, and the Pareto front.

Built from the Optuna storage alone, so a resumed or finished study can always
be reported again.
"""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd

from search._base.attrs import StudyKey, TrialKey

__all__ = ["COLUMNS", "HV_ACCURACY_SPAN", "best_speedup", "chosen_point", "feasible", "hypervolume",
           "hypervolume_2d", "mark_front", "pareto_mask", "readable_front", "trials_frame",
           "within_drop"]

COLUMNS = ["trial", "accuracy", "test_accuracy", "latency_ms", "latency_p90_ms", "latency_cv",
           "latency_noisy", "latency_source", "device", "speedup", "size_mb", "macs", "params",
           "sparsity", "int8_layers", "precisions", "dropped_blocks", "baseline", "reference",
           "cached_from", "refined_from", "feasible", "on_front"]
HV_ACCURACY_SPAN = 10.0  # points below the reference's accuracy where the hypervolume box ends


def _mix(precisions: dict[str, str]) -> str:
    """``{"a": "int8", "b": "fp32", "c": "int8"}`` -> ``"int8:2 fp32:1"``."""
    counts: dict[str, int] = {}
    for p in precisions.values():
        counts[p] = counts.get(p, 0) + 1
    return " ".join(f"{p}:{n}" for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def pareto_mask(accuracy: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """True where no other point is at least as accurate and as fast, and better in one."""
    acc, lat = np.asarray(accuracy, float), np.asarray(latency, float)
    mask = np.ones(len(acc), dtype=bool)
    for i in range(len(acc)):
        dominated = (acc >= acc[i]) & (lat <= lat[i]) & ((acc > acc[i]) | (lat < lat[i]))
        mask[i] = not dominated.any()
    return mask


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per COMPLETE trial with its results, speedup and front membership."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        precisions = a.get(TrialKey.LAYER_PRECISIONS, {})
        row = {
            "trial": t.number,
            "accuracy": t.values[0],
            "test_accuracy": a.get(TrialKey.TEST_ACCURACY),
            "latency_ms": t.values[1],
            "latency_p90_ms": a.get(TrialKey.LATENCY_P90_MS),
            "latency_cv": a.get(TrialKey.LATENCY_CV),
            "latency_noisy": bool(a.get(TrialKey.LATENCY_NOISY, False)),
            "latency_source": a.get(TrialKey.LATENCY_SOURCE),
            "device": a.get(TrialKey.DEVICE),
            "size_mb": a.get(TrialKey.SIZE_MB),
            "macs": a.get(TrialKey.MACS),
            "params": a.get(TrialKey.PARAMS),
            "sparsity": a.get(TrialKey.SPARSITY),
            "int8_layers": f"{sum(p == 'int8' for p in precisions.values())}/{len(precisions)}",
            "baseline": a.get(TrialKey.BASELINE, ""),
            "reference": bool(a.get(TrialKey.REFERENCE, False)),
            "precisions": _mix(precisions),
            "dropped_blocks": " ".join(a.get(TrialKey.DROPPED_BLOCKS, [])),
            "cached_from": a.get(TrialKey.CACHED_FROM),
            "refined_from": a.get(TrialKey.REFINED_FROM),
        }
        row.update({f"param.{k}": v for k, v in a.get(TrialKey.CHOICES, {}).items()})
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame(rows).sort_values("trial").reset_index(drop=True)
    base = df.loc[df["reference"], "latency_ms"]
    reference = float(base.iloc[0]) if len(base) else float("nan")
    df["speedup"] = reference / df["latency_ms"]
    df["feasible"] = feasible(df, study.user_attrs.get(StudyKey.MAX_ACCURACY_DROP),
                              study.user_attrs.get(StudyKey.MAX_LATENCY_MS))
    mark_front(df)
    remeasured = study.user_attrs.get(StudyKey.REMEASURED)
    if remeasured:  # the front and baselines measured again side by side (search.study.refine)
        df["latency_remeasured_ms"] = [remeasured.get(str(n), {}).get("median_ms")
                                       for n in df["trial"]]
        base_now = df.loc[df["reference"], "latency_remeasured_ms"]
        if len(base_now) and base_now.notna().all():
            df["speedup_remeasured"] = float(base_now.iloc[0]) / df["latency_remeasured_ms"]
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + extra]


def feasible(df: pd.DataFrame, max_drop: float | None, max_latency_ms: float | None) -> pd.Series:
    """Rows within the study's constraints (accuracy drop against the reference, latency)."""
    ok = pd.Series(True, index=df.index)
    base = df.loc[df["reference"], "accuracy"]
    if max_drop is not None and len(base):
        ok &= df["accuracy"] >= float(base.iloc[0]) - max_drop - 1e-9
    if max_latency_ms is not None:
        ok &= df["latency_ms"] <= max_latency_ms
    return ok


def mark_front(df: pd.DataFrame) -> pd.DataFrame:
    """Set ``on_front``: the feasible rows no other feasible row dominates (in place)."""
    df["on_front"] = False
    ok = df["feasible"].to_numpy()
    df.loc[ok, "on_front"] = pareto_mask(df.loc[ok, "accuracy"].to_numpy(),
                                         df.loc[ok, "latency_ms"].to_numpy())
    return df


def hypervolume(df: pd.DataFrame, span: float = HV_ACCURACY_SPAN) -> float:
    """Share of the box [reference accuracy - ``span``, reference accuracy] x [0, reference
    latency] that the feasible trials dominate (Optuna's hypervolume).

    1.0 would be the reference's accuracy at zero latency; uniform int8 at no loss
    and 2.8x speedup scores about 0.64. Trials slower than the reference or more
    than ``span`` points worse add nothing.
    """
    ref = df[df["reference"]]
    if df.empty or ref.empty:
        return 0.0
    acc0, lat0 = float(ref["accuracy"].iloc[0]), float(ref["latency_ms"].iloc[0])
    rows = df[df["feasible"]] if "feasible" in df else df
    loss = np.stack([-(rows["accuracy"].to_numpy(float) - (acc0 - span)) / span,
                     rows["latency_ms"].to_numpy(float) / lat0], axis=1)
    loss = loss[(loss[:, 0] < 0) & (loss[:, 1] < 1)]
    if not len(loss):
        return 0.0
    return hypervolume_2d(loss, (0.0, 1.0))


def hypervolume_2d(points: np.ndarray, reference: tuple[float, float]) -> float:
    """Area that ``points`` (two objectives, both minimized) dominate below ``reference``.

    A sweep over the first objective: each step adds the strip up to the next
    point, as high as the best second objective seen so far.
    """
    pts = np.asarray(points, float).reshape(-1, 2)
    pts = pts[(pts[:, 0] < reference[0]) & (pts[:, 1] < reference[1])]
    if not len(pts):
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    area, best_y = 0.0, reference[1]
    edges = np.append(pts[1:, 0], reference[0])
    for (x, y), next_x in zip(pts, edges, strict=True):
        best_y = min(best_y, y)
        area += (next_x - x) * (reference[1] - best_y)
    return float(area)


def chosen_point(df: pd.DataFrame, max_drop: float) -> pd.Series | None:
    """The point a study reports: the fastest trial within ``max_drop`` points of the
    reference's accuracy on validation (the only split selection reads), by its speedup
    measured side by side where there is one. None when no trial is within the drop."""
    base = df.loc[df["reference"], "accuracy"]
    if df.empty or base.empty:
        return None
    ok = df[df["accuracy"] >= float(base.iloc[0]) - max_drop]
    if "speedup_remeasured" in ok and ok["speedup_remeasured"].notna().any():
        # measured side by side with the reference after the study: only those count. A
        # trial left out of that (dominated, e.g. the source of a refinement, same model
        # size) would bring its screening-time number, measured at another moment
        ok = ok[ok["speedup_remeasured"].notna()].assign(_speedup=ok["speedup_remeasured"])
    else:
        ok = ok.assign(_speedup=ok["speedup"])
    if not len(ok):
        return None
    return ok.sort_values("_speedup", ascending=False, kind="stable").iloc[0].drop("_speedup")


def best_speedup(df: pd.DataFrame, max_drop: float) -> float | None:
    """The speedup of :func:`chosen_point` (the best within ``max_drop`` points)."""
    best = chosen_point(df, max_drop)
    if best is None:
        return None
    remeasured = best.get("speedup_remeasured")
    return float(remeasured if remeasured is not None and pd.notna(remeasured)
                 else best["speedup"])


def within_drop(rows: pd.DataFrame, df: pd.DataFrame, max_drop: float) -> pd.Series:
    """Rows of ``rows`` at most ``max_drop`` points below the reference trial of ``df``."""
    base = df.loc[df["reference"], "accuracy"]
    if base.empty:
        return pd.Series(True, index=rows.index)
    return rows["accuracy"] >= float(base.iloc[0]) - max_drop - 1e-9


def readable_front(df: pd.DataFrame, max_drop: float) -> pd.DataFrame:
    """The front and the baselines as a person reads them: the points within ``max_drop``
    points of the reference first (fastest first), then the rest of the front.

    A collapsed model (16 % accurate) is on the front when it is the fastest, but no one
    deploys it; it stays listed, after what a user can act on (``within_drop`` column).
    """
    if df.empty:
        return df.assign(within_drop=pd.Series(dtype=bool))
    shown = df[df["on_front"] | (df["baseline"] != "")].copy()
    shown["within_drop"] = within_drop(shown, df, max_drop)
    return shown.sort_values(["within_drop", "latency_ms"], ascending=[False, True], kind="stable")
