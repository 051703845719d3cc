"""The ``search`` command: parse flags into a SearchConfig and call the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from search.config import LATENCY_MODES, SAMPLERS, SearchConfig
from search.errors import SearchError

__all__ = ["main"]

_FRONT_COLUMNS = ["trial", "accuracy", "test_accuracy", "latency_ms", "latency_source", "speedup",
                  "size_mb", "precisions", "sparsity", "param.structured_ratio", "param.epochs",
                  "on_front", "baseline"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of trials, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="search",
        description="Hardware-aware compression search: a multi-objective Optuna study over "
                    "pruning, distillation and per-layer precision, scored on the device.",
    )
    parser.add_argument("--profile", required=True,
                        help="hardware profile name (see hardware_profiles/) or a YAML path")
    parser.add_argument("--budget", required=True, type=_positive_int,
                        help="number of COMPLETE trials the study should end with")
    parser.add_argument("--task", default="digits", help="task to compress (default: digits)")
    parser.add_argument("--space", default="default", help="search space name or YAML path")
    parser.add_argument("--study-name", help="default: <task>-<profile>; rerun to resume")
    parser.add_argument("--storage", help="Optuna storage URL (default: SQLite in search-runs/)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in search-runs/)")
    parser.add_argument("--output-dir", type=Path, help="default: search-runs/<study-name>/")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: start a local Ray)")
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    parser.add_argument("--parallel", type=_positive_int, default=1,
                        help="trials in flight at once (default 1)")
    parser.add_argument("--max-accuracy-drop", type=float, default=1.0,
                        help="accuracy drop (points) allowed when reporting the best speedup")
    parser.add_argument("--latency", choices=LATENCY_MODES, default="auto",
                        help="measure on the device, predict with the profile's latency model, "
                             "or auto: measure where the device is reachable (default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _print_result(result) -> None:  # noqa: ANN001
    import pandas as pd

    front = result.front[[c for c in _FRONT_COLUMNS if c in result.front.columns]]
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        n_front = int(result.front["on_front"].sum()) if len(result.front) else 0
        print(f"\nPareto front of {result.study_name} ({n_front} of {len(result.trials)} "
              f"completed trials, {result.n_failed} failed; baselines shown for reference):")
        print(front.to_string(index=False))
    if result.best_speedup is not None:
        print(f"\nbest speedup within the allowed accuracy drop: {result.best_speedup:.2f}x")
    print(f"\nwrote {result.output_dir / 'pareto.csv'} and {result.output_dir / 'trials.csv'}")
    uri = result.tracking_uri
    if uri.startswith("sqlite:"):
        print(f"review in MLflow:  mlflow ui --backend-store-uri {uri}")
    else:
        print(f"review in MLflow at {uri} (parent run {result.parent_run_id})")
    print(f"wall time {result.wall_s:.0f} s")


def _configure_logging() -> None:
    """Our messages at INFO on stderr; the libraries' chatter only from WARNING up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("search: %(message)s"))
    ours = logging.getLogger("search")
    if not ours.handlers:
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    for name in ("mlflow", "alembic", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def profiles_command(argv: list[str]) -> int:
    """``search profiles``: every profile, what it runs, and whether it can be measured here."""
    parser = argparse.ArgumentParser(prog="search profiles",
                                     description="List the hardware profiles.")
    parser.parse_args(argv)
    from search.profiles import available_profiles, load_profile, measurable_here

    for name in available_profiles():
        try:
            profile = load_profile(name)
        except SearchError as exc:
            print(f"{name}: INVALID: {exc}")
            continue
        ok, why = measurable_here(profile)
        ops = "; ".join(f"{op} {'/'.join(p)}" for op, p in profile.precisions.items())
        latency = "measured here" if ok else (
            f"predicted ({why})" if profile.latency_model else f"unavailable ({why})")
        print(f"{profile.name:<16} {profile.device_class:<5} {ops}")
        print(f"{'':<16} latency: {latency}; sparse kernels: {profile.sparse_kernels}; "
              f"channel multiple {profile.channel_multiple}; Ray resource {profile.resource}")
        if profile.legacy:
            print(f"{'':<16} legacy: {' '.join(profile.legacy.split())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "profiles":
        return profiles_command(argv[1:])
    args = build_parser().parse_args(argv)
    _configure_logging()
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    config = SearchConfig(
        profile=args.profile, budget=args.budget, task=args.task, space=args.space,
        study_name=args.study_name, storage=args.storage, tracking_uri=args.tracking_uri,
        output_dir=args.output_dir, ray_address=args.ray_address, seed=args.seed,
        sampler=args.sampler, parallel=args.parallel, max_accuracy_drop=args.max_accuracy_drop,
        latency=args.latency,
    )
    from search.study import run_search

    try:
        result = run_search(config, show_progress=not args.quiet)
    except SearchError as exc:
        print(f"search: error: {exc}", file=sys.stderr)
        return exc.exit_code
    _print_result(result)
    if result.interrupted:
        print("search: interrupted; completed trials are saved. Rerun the same command to "
              "resume the study.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
