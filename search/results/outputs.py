"""What a study leaves on disk and in its MLflow parent run when it ends or is interrupted.

``trials.csv`` (every trial, with why a trial failed or stopped early),
``pareto.csv`` (the front, points within the allowed drop first, and the
baselines), ``pareto.png`` / ``pareto.html``, ``front_models/``, ``config.yaml``,
``profile.yaml`` and ``summary.md``; then the MLflow parent run is completed
from the Optuna storage.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml

from search._base.attrs import StudyKey, TrialKey, failure_reason
from search._base.net import server_reachable
from search._base.paths import model_path
from search._base.redact import redact
from search.config import SearchConfig
from search.profiles import HardwareProfile
from search.results.pareto import best_speedup, hypervolume, readable_front, trials_frame
from search.results.render import front_markdown, plot_front, write_html
from search.results.tracking import Tracker
from search.results.trial_logging import MlflowTrialLogger

__all__ = ["write_outputs"]

log = logging.getLogger("search")


def _noisy_note(df: pd.DataFrame, cfg: SearchConfig) -> str:
    """A warning when some measurements stayed noisy (column latency_noisy in trials.csv)."""
    noisy = df.loc[df["latency_noisy"].fillna(False).astype(bool), "trial"].tolist() if len(df) else []
    if not noisy:
        return ""
    return (f"; **warning: {len(noisy)} noisy measurement(s)** (trials "
            f"{', '.join(map(str, noisy))}: coefficient of variation above the profile's max_cv "
            "after a repeat; see latency_noisy in trials.csv, and rerun on a quieter machine)")


def _unfinished_row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A FAIL or PRUNED trial's row of trials.csv: its choices, and why it ended."""
    a = t.user_attrs
    row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
    if t.state == optuna.trial.TrialState.FAIL:
        row["failure"] = failure_reason(t)
    else:
        row["pruned_reason"] = a.get(TrialKey.PRUNED_REASON, "")
        row.update({k: a.get(k) for k in (TrialKey.LATENCY_MS, TrialKey.LATENCY_SOURCE,
                                          TrialKey.MACS, TrialKey.PARAMS, TrialKey.CACHED_FROM)
                    if k in a})
    row.update({f"param.{k}": v for k, v in (a.get(TrialKey.CHOICES) or t.params).items()})
    return row


def _summary(cfg: SearchConfig, df: pd.DataFrame, front: pd.DataFrame, failed: list,
             best: float | None, n_pruned: int = 0, metric: dict | None = None) -> str:
    """A short human summary of the study (summary.md)."""
    metric = metric or {}
    name = metric.get("name", "accuracy")
    lines = [f"# {cfg.study_name}", "",
             f"- profile `{cfg.profile}`, task `{cfg.task}`, space `{cfg.space}`, "
             f"sampler `{cfg.sampler}`, seed {cfg.seed}",
             f"- metric: {name} on the validation split (test beside it); the allowed drop is "
             f"in {name} points",
             f"- {len(df)} completed trials, {n_pruned} stopped early (could not reach the front) "
             f"of a budget of {cfg.budget}, {len(failed)} failed",
             f"- latency: {', '.join(sorted(set(df['latency_source'].dropna()))) or 'n/a'}"
             + (f", the network's alone ({metric['decoding']})" if metric.get("decoding") else "")
             + _noisy_note(df, cfg),
             f"- best speedup within {cfg.report_drop:g} point(s) of the reference"
             + (" (measured side by side with it after the study, where re-measured)"
                if "speedup_remeasured" in df else "") + ": "
             + (f"{best:.2f}x" if best else "n/a"), ""] + front_markdown(front, cfg.report_drop, name)
    return "\n".join(lines) + "\n"


def _warning_lines(warnings: list[str]) -> str:
    """The study's warnings (a teacher near chance, ...) at the end of summary.md."""
    return "".join(f"\n**warning**: {w}\n" for w in warnings)


def write_outputs(study: optuna.Study, cfg: SearchConfig, tracker: Tracker, interrupted: bool,
                   profile: HardwareProfile, input_shape: tuple[int, ...],
                   providers: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's files (trials, front, plots, models, settings, summary), then its MLflow
    parent run completed from them; returns (trials, the front as shown to users)."""
    out = Path(cfg.output_dir)
    metric = study.user_attrs.get(StudyKey.METRIC) or {}
    name = metric.get("name", "accuracy")
    df = trials_frame(study)
    failed = [t for t in study.get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.FAIL]
    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    all_rows = df.assign(state="COMPLETE")
    if failed or pruned:
        others = pd.DataFrame([_unfinished_row(t) for t in failed + pruned])
        all_rows = pd.concat([all_rows, others], ignore_index=True).sort_values("trial")
    front = df[df["on_front"]].sort_values("latency_ms") if len(df) else df
    all_rows.to_csv(out / "trials.csv", index=False)
    # pareto.csv: the front, plus the baselines as reference rows (on_front tells which is which)
    shown = readable_front(df, cfg.report_drop)  # what a user can deploy first
    # the accuracy columns hold the task's metric: the file says which
    shown.assign(metric=name).to_csv(out / "pareto.csv", index=False)
    artifacts = [out / "pareto.csv", out / "trials.csv"]
    if len(df):
        title = f"{cfg.study_name}: {len(df)} trials, front of {len(front)}"
        artifacts.append(plot_front(df, out / "pareto.png", title, cfg.report_drop, name))
        artifacts.append(write_html(df, out / "pareto.html", title, name))
    models = _copy_front_models(out, front)
    artifacts.append(out / "front_models")
    best = best_speedup(df, cfg.report_drop) if len(df) else None
    artifacts += _write_settings(out, cfg, profile)
    summary = out / "summary.md"
    summary.write_text(_summary(cfg, df, shown[shown["on_front"]], failed, best, len(pruned),
                                metric)
                       + _warning_lines(study.user_attrs.get(StudyKey.WARNINGS, [])))
    artifacts.append(summary)
    if not server_reachable(tracker.uri):
        log.warning("MLflow tracking server %s is unreachable; the CSVs are written, and "
                    "rerunning the command completes the MLflow run", redact(tracker.uri))
        return df, shown
    try:
        MlflowTrialLogger(tracker).catch_up(study)  # missed during an outage or a crash
        if len(df):  # the final value, at the last trial's step of the history
            tracker.log_summary_metrics({"hypervolume": hypervolume(df)},
                                        step=int(df["trial"].max()))
        tracker.mark_front(set(int(n) for n in front["trial"]))
        tracker.log_models(models, input_shape, providers)
        base = df.loc[df["reference"], "accuracy"] if len(df) else pd.Series(dtype=float)
        tracker.finish(
            {"front_size": len(front), "completed_trials": len(df), "failed_trials": len(failed),
             "best_speedup_within_drop": best,
             "baseline_accuracy": float(base.iloc[0]) if len(base) else None},
            artifacts, status="KILLED" if interrupted else "FINISHED",
        )
    except Exception as exc:  # results are safe in the Optuna storage and the CSVs
        log.warning("MLflow logging failed (%s: %s); the CSVs are written, and rerunning the "
                    "command completes the MLflow run", type(exc).__name__, redact(str(exc))[:300])
    return df, shown


def _copy_front_models(out: Path, front: pd.DataFrame) -> dict[int, Path]:
    """The front's ONNX models copied to ``front_models/`` (trial number -> path)."""
    front_models = out / "front_models"
    front_models.mkdir(exist_ok=True)
    models: dict[int, Path] = {}
    for n in front["trial"]:
        src = model_path(out, int(n))
        if src.exists():
            (front_models / src.name).write_bytes(src.read_bytes())
            models[int(n)] = front_models / src.name
    return models


def _write_settings(out: Path, cfg: SearchConfig, profile: HardwareProfile) -> list[Path]:
    """config.yaml (the resolved settings, secrets redacted) and profile.yaml."""
    config_path = out / "config.yaml"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings.update(storage=redact(cfg.storage), tracking_uri=redact(cfg.tracking_uri))
    config_path.write_text(yaml.safe_dump(settings, sort_keys=True))
    profile_path = out / "profile.yaml"
    profile_path.write_text(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
    return [config_path, profile_path]
