"""Every setting of a search, declared once, and the validated configuration built from them.

A setting is one field of :class:`SearchConfig`, declared with :func:`setting`: its type and
default (the dataclass field), its rule (pydantic constraints), its flag and its help. The
config-file schema (:class:`Settings`), the command line's flags (``search.cli``) and the
error messages are all derived from that one declaration, and the study's parts receive the
validated ``SearchConfig`` itself, so adding a setting means declaring it here and reading it
where it is used. Validation happens here, once, before anything is computed or written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from pydantic import Field, StrictInt, ValidationError, create_model, field_validator

from search._base.errors import ConfigError
from search._base.schema import Strict, load_model

__all__ = ["DEFAULT_EXPERIMENT", "ENV_DEFAULTS", "LATENCY_MODES", "REPORT_DROP", "SAMPLERS",
           "SearchConfig", "Setting", "Settings", "default_study_name", "ensure_writable",
           "load_config_file", "setting", "settings_fields"]

log = logging.getLogger("search")

SamplerName = Literal["tpe", "nsga2", "gp", "random"]
LatencyMode = Literal["auto", "measure", "predict"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
LATENCY_MODES: tuple[str, ...] = get_args(LatencyMode)
DEFAULT_EXPERIMENT = "compression-search"  # the MLflow experiment, unless named otherwise
# Settings the ecosystem's own environment variables give when nothing else does: below
# a flag and a config file, above the built-in default (so `ray job submit -- search ...`
# runs on the job's cluster, and an MLflow user's exported server is used).
ENV_DEFAULTS = {"tracking_uri": "MLFLOW_TRACKING_URI", "experiment_name": "MLFLOW_EXPERIMENT_NAME",
                "ray_address": "RAY_ADDRESS"}
REPORT_DROP = 1.0  # points of accuracy the best speedup is reported within by default
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_PATH_SETTINGS = ("data_dir", "teacher", "sparse_init")  # relative to a config file


@dataclass(frozen=True)
class Setting:
    """What the command line and a config file know of one setting (a field's metadata)."""

    help: str
    flag: str | None = ""  # "": --<name with dashes>; None: config file only
    rule: dict[str, Any] = dataclasses.field(default_factory=dict)  # pydantic constraints

    def flag_of(self, name: str) -> str | None:
        return ("--" + name.replace("_", "-")) if self.flag == "" else self.flag


def setting(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002
            flag: str | None = "", **rule: Any) -> Any:  # noqa: ANN401
    """Declare one setting: ``default``, the ``help`` its flag shows, its ``flag`` ("" for
    ``--<name>``, None for config file only) and its rule (``ge=1``, ``gt=0``, ...)."""
    meta = {"setting": Setting(help, flag, rule)}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class SearchConfig:
    """What the user asked for; ``resolved()`` fills the defaults."""

    profile: str = setting(help="hardware profile name (`search profiles`) or a YAML path")
    budget: int = setting(help="number of COMPLETE trials the study ends with", ge=1)
    task: str = setting("digits", "digits (default), cifar10, imagefolder, or module:function "
                                  "returning a Task (your own model and data)")
    data_dir: Path | None = setting(None, "dataset directory for --task cifar10 / imagefolder "
                                          "(read once into memory; nothing is downloaded)")
    arch: str | None = setting(None, "torchvision classification architecture for the built-in "
                                     "tasks, e.g. resnet18, mobilenet_v2 (untrained; CIFAR-style "
                                     "stem for images <= 64 px)")
    teacher: Path | None = setting(None, "trained weights to compress (torch.save of a "
                                         "state_dict or model) instead of training the built-in "
                                         "teacher")
    image_size: int | None = setting(None, "--task imagefolder: resize and crop to this side "
                                           "(default: the first image's, at most 224)",
                                     ge=8, le=1024)
    sparse_init: Path | None = setting(
        None, "a pre-sparsified checkpoint of the same model: trials may start from it and "
              "keep its zeros while fine-tuning (sparse transfer)")
    teacher_epochs: int | None = setting(None, "epochs to train a built-in teacher (default per "
                                               "task; small for smoke runs)", ge=1)
    space: str = setting("default", "search space name or YAML path (default: default)")
    study_name: str | None = setting(None, "default: <task>-<profile>; rerun the command to "
                                           "resume")
    storage: str | None = setting(None, "Optuna storage: an RDB URL or a journal file "
                                        "(journal:///path); default: SQLite in search-runs/")
    tracking_uri: str | None = setting(None, "MLflow tracking URI (default: "
                                             "$MLFLOW_TRACKING_URI, else SQLite in search-runs/)")
    experiment_name: str | None = setting(None, "MLflow experiment of the study's runs (default: "
                                                "$MLFLOW_EXPERIMENT_NAME, else "
                                                f"{DEFAULT_EXPERIMENT})")
    output_dir: Path | None = setting(None, "default: search-runs/<study-name>/")
    ray_address: str | None = setting(None, "join this Ray cluster: auto, host:port or "
                                            "ray://host:port (default: $RAY_ADDRESS, else start "
                                            "a private local Ray)")
    seed: int = setting(0, "seed of the search: sampler and trials (default 0; a built-in "
                           "task's teacher is the same whatever the seed; a seed other than 0 "
                           "adds -seed<N> to the default study name, so that it starts a study "
                           "of its own)", ge=0)
    sampler: SamplerName = setting("tpe", "tpe (default: best hypervolume per trial in "
                                          "experiments/sampler_benchmark.py), nsga2, gp or random")
    parallel: int | None = setting(None, "trials in flight (default: what the cluster allows, "
                                         "one per node)", ge=1)
    # constraints: trials beyond them never reach the front (None: unconstrained, and the best
    # speedup is reported within REPORT_DROP points)
    max_accuracy_drop: float | None = setting(
        None, "constraint: trials losing more accuracy points than this against the reference "
              f"never reach the front (default: unconstrained; best speedup reported within "
              f"{REPORT_DROP:g})", ge=0)
    max_latency_ms: float | None = setting(None, "constraint: trials slower than this never "
                                                 "reach the front", gt=0)
    latency: LatencyMode = setting("auto", "measure on the device, predict with the profile's "
                                           "latency model, or auto: measure where the device is "
                                           "reachable (default)")
    time_limit_s: float | None = setting(None, "seconds after which no new trial starts: the "
                                               "study ends with fewer than --budget trials, "
                                               "then refines (default: none)",
                                         flag="--time-limit", gt=0)
    grace_period_s: float = setting(30.0, "seconds running trials get to finish after Ctrl-C "
                                          "(default 30)", flag="--grace-period", ge=0)
    batch_size: int | None = setting(None, "inputs per inference that latency is measured or "
                                           "predicted for (default: the profile's, 1 on CPUs); "
                                           "GPUs pay off at deployment batch sizes", ge=1, le=4096)
    # multi-fidelity and refinement (search.study.driver, search.study.refine)
    refine: int = setting(4, "front members given a longer distillation after the budget, then "
                             "re-measured side by side with the baselines (default 4; 0: none)",
                          ge=0)
    refine_epochs: int | None = setting(None, "distillation epochs of a refinement (default: "
                                              "twice the space's longest, >= 12)", ge=1)
    refine_timeout_s: float = setting(600.0, "no refinement starts later than this many seconds "
                                             "after the budget", flag=None, ge=0)
    early_stopping: bool = setting(True, "fine-tune every trial to the end, even one that "
                                         "cannot reach the front", flag="--no-early-stopping")
    max_failures: int | None = setting(None, "failed trials after which the study stops, "
                                             "keeping what completed (default: the budget, at "
                                             "least 10)", ge=1)
    runs_root: Path = Path("search-runs")  # where defaults put outputs and stores (API only)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming each bad setting (and its flag) and what is allowed.

        The rules are :class:`Settings`' (the same a config file is checked against).
        """
        given = ((f.name, getattr(self, f.name)) for f in fields(self) if f.name in Settings.model_fields)
        values = {k: str(v) if isinstance(v, Path) else v for k, v in given if v is not None}
        try:
            Settings.model_validate(values)
        except ValidationError as exc:
            lines = [f"{_named(e['loc'][0] if e['loc'] else '')}: "
                     f"{e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})"
                     for e in exc.errors()]
            raise ConfigError("invalid setting" + ("s:\n  " if len(lines) > 1 else " ")
                              + "\n  ".join(lines)) from None

    @property
    def report_drop(self) -> float:
        """The accuracy drop the best speedup is reported within."""
        return REPORT_DROP if self.max_accuracy_drop is None else self.max_accuracy_drop

    @property
    def failure_limit(self) -> int:
        """Failed trials after which the study stops: a space or a model that fails most
        trials should say so early, but a few failures in a long study are not a reason."""
        return self.max_failures if self.max_failures is not None else max(10, self.budget)

    def resolved(self, profile_name: str) -> SearchConfig:
        """A copy with every default filled in (study name, directories, store URLs).

        Settings left unset take the environment's value (``ENV_DEFAULTS``) first.
        """
        self.validate()
        name = self.study_name or default_study_name(self.task, self.arch, profile_name,
                                                     self.seed)
        root = Path(self.runs_root)
        env = _from_environment(self)
        env.setdefault("experiment_name", self.experiment_name or DEFAULT_EXPERIMENT)
        return replace(
            self,
            **env,
            study_name=name,
            output_dir=Path(self.output_dir) if self.output_dir else root / name,
            storage=self.storage or f"sqlite:///{(root / 'optuna.db').resolve()}",
        )


def settings_fields() -> list[tuple[dataclasses.Field, Setting, Any]]:
    """Every declared setting: its field, its :class:`Setting` and its type, in order."""
    hints = get_type_hints(SearchConfig)
    return [(f, f.metadata["setting"], hints[f.name]) for f in fields(SearchConfig)
            if "setting" in f.metadata]


def _named(name: object) -> str:
    """``budget (--budget)``: the name a config file uses and the flag a command line uses."""
    meta = {f.name: s for f, s, _ in settings_fields()}.get(str(name))
    flag = meta.flag_of(str(name)) if meta else "--" + str(name).replace("_", "-")
    return f"{name} ({flag})" if flag else f"{name} (config file)"


def _file_type(hint: Any) -> Any:  # noqa: ANN401
    """A setting's type as a config file gives it: paths as strings, whole numbers strict
    (``true`` is not 1)."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    if hint is Path:
        return str
    if hint is int:
        return StrictInt
    return hint


class _Rules(Strict):
    """The rules that are not ranges."""

    @field_validator("study_name", check_fields=False)
    @classmethod
    def _study_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError("use letters, digits, '.', '_' or '-', starting with a letter or "
                             "digit, at most 128 characters")
        return value

    @field_validator("experiment_name", check_fields=False)
    @classmethod
    def _experiment_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value


def _settings_model() -> type[Strict]:
    """What a config file is read as (the flags' names in snake_case, all optional), and what
    flags + file + defaults must satisfy: derived from the declarations above."""
    spec = {f.name: (Annotated[_file_type(hint) | None, Field(**meta.rule)], None)
            for f, meta, hint in settings_fields()}
    return create_model("Settings", __base__=_Rules, __doc__=_SETTINGS_DOC, **spec)


_SETTINGS_DOC = """Every setting's rule: a config file (``search --config F``) is checked against
it when read, and so is what the flags, the file and the defaults resolve to
(:meth:`SearchConfig.validate`), whoever built it. Flags typed on the command line beat the
file, which beats the defaults."""
Settings = _settings_model()


def _from_environment(config: SearchConfig) -> dict[str, str]:
    """The unset settings an environment variable gives, each logged: it decides where the
    results go, and a user may not remember having exported it."""
    from search._base.redact import redact

    found = {}
    for key, var in ENV_DEFAULTS.items():
        value = os.environ.get(var, "").strip()
        if getattr(config, key) is None and value:
            found[key] = value
            flag = "--" + key.replace("_", "-")
            log.info("%s from $%s: %s (%s or the config file's %s beats it)",
                     key.replace("_", " "), var, redact(value), flag, key)
    return found


def default_study_name(task: str, arch: str | None, profile: str, seed: int = 0) -> str:
    """``<task>[-<arch>]-<profile>[-seed<N>]``; a plugin's ``module:function`` becomes
    ``module.function``. Another seed is another study: rerunning with ``--seed 1`` would
    otherwise resume (and show) the seed-0 study already done."""
    parts = [task.replace(":", "."), arch, profile, f"seed{seed}" if seed else None]
    name = "-".join(p for p in parts if p)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:128]


def ensure_writable(directory: Path, what: str) -> None:
    """Create ``directory`` and prove a file can be written there, or raise ConfigError."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{what} {directory} cannot be written ({exc.strerror or exc}); "
            "choose a writable directory"
        ) from None


def load_config_file(path: Path) -> dict[str, object]:
    """The settings a config file gives (only those it names).

    Relative ``data_dir`` / ``teacher`` / ``sparse_init`` paths are relative to the file, so
    an experiment file works from any directory.
    """
    path = Path(path)
    values = load_model(Settings, path).model_dump(exclude_none=True)
    for key in _PATH_SETTINGS:
        if key in values:
            p = Path(str(values[key])).expanduser()
            values[key] = p if p.is_absolute() else path.parent / p
    return values
