"""The ``search`` command: parse flags into a SearchConfig and call the library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from search._base.errors import SearchError
from search.config import SearchConfig

__all__ = ["main"]

_FRONT_COLUMNS = ["trial", "accuracy", "test_accuracy", "latency_ms", "latency_source", "speedup",
                  "speedup_remeasured", "size_mb", "precisions", "sparsity",
                  "param.structured_ratio", "param.epochs", "on_front", "baseline"]


def _whole_number(text: str) -> int:
    """Parse only: the range each setting allows is checked once, by ``config.Settings``."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


_ENVIRONMENT = """\
environment variables (a flag and the config file beat them):
  MLFLOW_TRACKING_URI     --tracking-uri
  MLFLOW_EXPERIMENT_NAME  --experiment-name
  RAY_ADDRESS             --ray-address (set by `ray job submit` for the job it runs)
"""


def _version() -> str:
    """The installed distribution's version (one number, kept in pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hw-compression-search")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """Every flag defaults to None so that a flag the user typed can beat the config file.

    Without a subcommand ``search`` runs a study, so ``search --profile X --budget N``
    stays the short form; the subcommands are listed in ``--help``.
    """
    parser = argparse.ArgumentParser(
        prog="search",
        description="Hardware-aware compression search: a multi-objective Optuna study over "
                    "pruning, distillation and per-layer precision, scored on the device.",
        epilog=_ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--version", action="version", version=f"%(prog)s {_version()}")
    _add_verbose(parser, default=False)
    add("--config", type=Path, help="YAML file with any of these settings (flags beat it)")
    _add_settings(parser)
    add("--quiet", action="store_true", help="no progress bar")
    _add_subcommands(parser)
    return parser


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per declared setting (``search.config.setting``), its type, choices and help
    from the declaration; each defaults to None so that a flag the user typed beats the
    config file."""
    import typing

    from search.config import settings_fields

    for field, meta, hint in settings_fields():
        flag = meta.flag_of(field.name)
        if flag is None:
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) is not typing.Literal and len(args) == 1 else hint
        kwargs: dict[str, object] = {"dest": field.name, "help": meta.help}
        if base is bool:
            kwargs.update(action="store_false" if field.default else "store_true", default=None)
        elif typing.get_origin(base) is typing.Literal:
            kwargs["choices"] = typing.get_args(base)
        elif base in (int, float, Path):
            kwargs["type"] = _whole_number if base is int else base
        parser.add_argument(flag, **kwargs)


def _add_verbose(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v`` before or after a subcommand; a subcommand's copy must not reset the first."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug messages from search, info from Optuna and MLflow")


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    """Real subparsers, so ``search --help`` lists them; each runs ``args.run(args)``."""
    sub = parser.add_subparsers(
        dest="command", title="subcommands", metavar="COMMAND",
        description="without one, search runs (or resumes) a study; `search COMMAND --help` "
                    "for a subcommand's flags")
    profiles = sub.add_parser("profiles", help="list the hardware profiles and whether each can "
                                               "be measured here",
                              description="List the hardware profiles.")
    profiles.set_defaults(run=_profiles)
    report = sub.add_parser("report", help="print a stored study's Pareto front",
                            description="Print a study's Pareto front.")
    _add_study_args(report)
    report.set_defaults(run=_report)
    export = sub.add_parser("export", help="write one trial's ONNX model to a path",
                            description="Write a trial's ONNX model to a path.")
    _add_study_args(export)
    export.add_argument("--trial", type=int, required=True)
    export.add_argument("--to", type=Path, required=True)
    export.add_argument("--output-dir", type=Path, help="default: search-runs/<study>/")
    export.set_defaults(run=_export)
    spaces = sub.add_parser("spaces", help="show what a search space samples on a profile, "
                                           "and why", description="Show what a search space "
                            "samples on a profile, for a task's model, and why.")
    spaces.add_argument("--profile", required=True, help="profile name or YAML path")
    spaces.add_argument("--space", default="default", help="space name or YAML path")
    spaces.add_argument("--task", default="digits", help="the task whose model is compressed")
    spaces.add_argument("--arch", help="torchvision architecture for a built-in task")
    spaces.set_defaults(run=_spaces)
    for command in (profiles, report, export, spaces):
        _add_verbose(command, default=argparse.SUPPRESS)


_NOT_SETTINGS = ("config", "quiet", "verbose", "command", "run")


def _settings(args: argparse.Namespace) -> dict[str, object]:
    """The config file, then the flags actually typed over it; what neither sets comes from
    the environment, then the defaults (``SearchConfig.resolved``)."""
    from search.config import load_config_file

    values: dict[str, object] = {}
    if args.config is not None:
        values.update(load_config_file(args.config))
    typed = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_SETTINGS}
    values.update(typed)
    return values


def _print_front(shown, metric: str = "accuracy") -> None:  # noqa: ANN001
    """What a user can deploy first (within the allowed drop), then the rest of the front."""
    import pandas as pd

    usable = shown["within_drop"] if "within_drop" in shown else pd.Series(True, index=shown.index)
    table = shown[[c for c in _FRONT_COLUMNS if c in shown.columns]]
    table = table.rename(columns={"accuracy": metric, "test_accuracy": f"test_{metric}"})
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        print(table[usable].to_string(index=False) if usable.any() else
              f"no point of the front is within the allowed {metric} drop")
        if (~usable).any():
            print(f"\nthe rest of the front, beyond the allowed {metric} drop:")
            print(table[~usable].to_string(index=False))


def _print_result(result) -> None:  # noqa: ANN001
    n_front = int(result.front["on_front"].sum()) if len(result.front) else 0
    print(f"\nPareto front of {result.study_name} ({n_front} of {len(result.trials)} "
          f"completed trials, {result.n_pruned} stopped early, {result.n_failed} failed; "
          "baselines shown for reference):")
    _print_front(result.front, result.metric)
    if result.best_speedup is not None:
        print(f"\nbest speedup within the allowed {result.metric} drop: "
              f"{result.best_speedup:.2f}x")
    print(f"\nwrote {result.output_dir / 'pareto.csv'} and {result.output_dir / 'trials.csv'}")
    from search._base.redact import redact

    uri = redact(result.tracking_uri)
    if uri.startswith("sqlite:"):
        print(f"review in MLflow:  mlflow ui --backend-store-uri {uri}")
    else:
        print(f"review in MLflow at {uri} (parent run {result.parent_run_id})")
    print(f"wall time {result.wall_s:.0f} s")


def _configure_logging(verbose: bool = False) -> None:
    """Our messages at INFO on stderr, the libraries' from WARNING up; ``verbose``: ours at
    DEBUG with their origin and time, and Optuna's and MLflow's INFO too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(name)s %(levelname)s: %(message)s" if verbose else "search: %(message)s"))
    ours = logging.getLogger("search")
    for old in list(ours.handlers):
        ours.removeHandler(old)
    ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    libraries = logging.INFO if verbose else logging.WARNING
    for name in ("mlflow", "alembic", "matplotlib"):
        logging.getLogger(name).setLevel(libraries)


def _quiet_optuna(verbose: bool = False) -> None:
    """Optuna logs every trial at INFO; the progress bar says it better (imports Optuna)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)


def _profiles(args: argparse.Namespace) -> int:
    """``search profiles``: every profile, what it runs, and whether it can be measured here."""
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


def _spaces(args: argparse.Namespace) -> int:
    """``search spaces --profile P``: what a space offers on a profile for a task's model, and
    why each dimension is there or not."""
    from search.profiles import load_profile
    from search.space.resolve import resolve_space
    from search.space.schema import available_spaces, load_space
    from search.tasks import TaskOptions, load_task
    from search.trial.pipeline import model_facts, student_layers

    profile, space = load_profile(args.profile), load_space(args.space)
    task = load_task(args.task, 0, TaskOptions(arch=args.arch))
    resolved = resolve_space(space, profile, student_layers(task), model_facts(task))
    print(f"space {space.name!r} on profile {profile.name!r} for {task.name} "
          f"(built-in spaces: {', '.join(available_spaces())}):")
    rows = resolved.describe()
    width = max(len(offered) for _, offered, _ in rows)
    for dimension, offered, why in rows:
        print(f"  {dimension:<22} {offered:<{width}}  {why}")
    return 0


def _add_study_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--storage", help="Optuna storage (default: SQLite in search-runs/)")


def _load_study(args: argparse.Namespace):  # noqa: ANN202
    import optuna

    from search.study.storage import open_storage

    storage = args.storage or f"sqlite:///{Path('search-runs', 'optuna.db').resolve()}"
    _quiet_optuna(args.verbose)
    try:
        return optuna.load_study(study_name=args.study, storage=open_storage(storage))
    except Exception as exc:  # KeyError for an unknown study, DB errors
        from search._base.redact import redact

        raise SearchError(f"cannot load study {args.study!r} from {redact(storage)}: "
                          f"{type(exc).__name__}: {redact(str(exc))}") from None


def _report(args: argparse.Namespace) -> int:
    """``search report --study S``: the front table, from the Optuna storage alone."""
    from search._base.attrs import StudyKey, metric_name
    from search.config import REPORT_DROP
    from search.results.pareto import readable_front, trials_frame

    study = _load_study(args)
    df = trials_frame(study)
    drop = study.user_attrs.get(StudyKey.MAX_ACCURACY_DROP)
    print(f"{args.study}: {len(df)} completed trials, front of {int(df['on_front'].sum())}")
    _print_front(readable_front(df, REPORT_DROP if drop is None else drop),
                 metric_name(study))
    return 0


def _export(args: argparse.Namespace) -> int:
    """``search export --study S --trial N --to PATH``: write one trial's ONNX model."""
    from search._base.paths import model_path

    source = model_path(args.output_dir or Path("search-runs") / args.study, args.trial)
    models = source.parent
    if not source.is_file():
        import optuna

        study = _load_study(args)
        done = sorted(t.number for t in study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        raise SearchError(f"no model for trial {args.trial} in {models}; completed trials: "
                          f"{done}")
    args.to.parent.mkdir(parents=True, exist_ok=True)
    args.to.write_bytes(source.read_bytes())
    print(f"wrote {args.to} (trial {args.trial} of {args.study})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    _configure_logging(args.verbose)
    if args.command is not None:
        try:
            return args.run(args)
        except SearchError as exc:
            print(f"search: error: {exc}", file=sys.stderr)
            return exc.exit_code
    return _study(parser, args)


def _study(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``search [flags]``: run or resume the study the flags and config file describe."""
    try:
        values = _settings(args)
    except SearchError as exc:
        print(f"search: error: {exc}", file=sys.stderr)
        return exc.exit_code
    missing = [f"--{k}" for k in ("profile", "budget") if values.get(k) is None]
    if missing:
        parser.error(f"{' and '.join(missing)} required (as flags or in --config)")
    for key in ("output_dir", "data_dir", "teacher", "sparse_init"):
        if key in values:
            values[key] = Path(str(values[key]))
    config = SearchConfig(**values)  # type: ignore[arg-type]
    from search._base.redact import redact
    from search.checks import check_inputs

    logging.getLogger("search").debug("settings (flags over %s): %s", args.config or "no config file",
                                      redact(repr(config)))
    try:
        check_inputs(config)  # bad input refused before torch, Ray and MLflow load (5-10 s)
        _quiet_optuna(args.verbose)
        from search.study.run import run_search

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
