"""The study's results as tables: every trial, and the Pareto front.

Built from the Optuna storage alone, so a resumed or finished study can always
be reported again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd

__all__ = ["COLUMNS", "best_speedup", "pareto_mask", "plot_front", "trials_frame"]

COLUMNS = ["trial", "accuracy", "test_accuracy", "latency_ms", "latency_p90_ms", "latency_cv",
           "latency_source", "device", "speedup", "size_mb", "macs", "params", "sparsity",
           "int8_layers", "precisions", "baseline", "reference", "on_front"]


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
        precisions = a.get("layer_precisions", {})
        row = {
            "trial": t.number,
            "accuracy": t.values[0],
            "test_accuracy": a.get("test_accuracy"),
            "latency_ms": t.values[1],
            "latency_p90_ms": a.get("latency_p90_ms"),
            "latency_cv": a.get("latency_cv"),
            "latency_source": a.get("latency_source"),
            "device": a.get("device"),
            "size_mb": a.get("size_mb"),
            "macs": a.get("macs"),
            "params": a.get("params"),
            "sparsity": a.get("sparsity"),
            "int8_layers": f"{sum(p == 'int8' for p in precisions.values())}/{len(precisions)}",
            "baseline": a.get("baseline", ""),
            "reference": bool(a.get("reference", False)),
            "precisions": _mix(precisions),
        }
        row.update({f"param.{k}": v for k, v in a.get("choices", {}).items()})
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame(rows).sort_values("trial").reset_index(drop=True)
    base = df.loc[df["reference"], "latency_ms"]
    reference = float(base.iloc[0]) if len(base) else float("nan")
    df["speedup"] = reference / df["latency_ms"]
    df["on_front"] = pareto_mask(df["accuracy"].to_numpy(), df["latency_ms"].to_numpy())
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + extra]


def best_speedup(df: pd.DataFrame, max_drop: float = 1.0) -> float | None:
    """Best speedup among trials within ``max_drop`` points of the reference's accuracy."""
    base = df.loc[df["reference"], "accuracy"]
    if df.empty or base.empty:
        return None
    ok = df[df["accuracy"] >= float(base.iloc[0]) - max_drop]
    return float(ok["speedup"].max()) if len(ok) else None


def plot_front(df: pd.DataFrame, path: Path, title: str) -> Path:
    """Accuracy against latency, the front highlighted, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(df["latency_ms"], df["accuracy"], c="#bbbbbb", label="trial")
    front = df[df["on_front"]].sort_values("latency_ms")
    ax.plot(front["latency_ms"], front["accuracy"], "o-", c="#d62728", label="Pareto front")
    for _, row in front.iterrows():
        ax.annotate(f"#{row['trial']}", (row["latency_ms"], row["accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    source = ", ".join(sorted(set(df["latency_source"].dropna()))) or "n/a"
    ax.set_xlabel(f"latency, ms ({source})")
    ax.set_ylabel("validation accuracy, %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
