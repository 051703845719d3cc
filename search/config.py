"""The validated configuration of one search, and its derived defaults.

Validation happens here, once, before anything is computed or written.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from pydantic import Field, StrictInt, ValidationError, field_validator

from search._base.errors import ConfigError
from search._base.schema import Strict, load_model

if TYPE_CHECKING:  # search.tasks imports torch: keep `search --help` and bad flags fast
    from search.tasks import TaskOptions

__all__ = ["ConfigFile", "DEFAULT_EXPERIMENT", "ENV_DEFAULTS", "LATENCY_MODES", "SAMPLERS",
           "SearchConfig", "Settings", "default_study_name", "ensure_writable", "load_config_file"]

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
# A setting's flag, where it is not --<name with dashes> (None: config file only)
_FLAGS = {"grace_period_s": "--grace-period", "early_stopping": "--no-early-stopping",
          "refine_timeout_s": None}


def _setting(name: object) -> str:
    """``budget (--budget)``: the name a config file uses and the flag a command line uses."""
    flag = _FLAGS.get(str(name), "--" + str(name).replace("_", "-"))
    return f"{name} ({flag})" if flag else f"{name} (config file)"


@dataclass(frozen=True)
class SearchConfig:
    """What the user asked for; ``resolved()`` fills the defaults."""

    profile: str
    budget: int
    task: str = "digits"
    space: str = "default"
    study_name: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else SQLite in runs_root
    experiment_name: str | None = None  # None: $MLFLOW_EXPERIMENT_NAME, else DEFAULT_EXPERIMENT
    output_dir: Path | None = None
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a private local Ray
    seed: int = 0
    sampler: str = "tpe"
    parallel: int | None = None  # None: what the cluster allows
    runs_root: Path = Path("search-runs")
    # constraints: trials beyond them never reach the front (None: unconstrained, and the best
    # speedup is reported within REPORT_DROP points)
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    latency: str = "auto"
    grace_period_s: float = 30.0
    data_dir: Path | None = None  # task options: see search.tasks.TaskOptions
    arch: str | None = None
    teacher: Path | None = None
    image_size: int | None = None
    teacher_epochs: int | None = None
    sparse_init: Path | None = None
    # multi-fidelity and refinement (search.study.driver, search.study.refine)
    early_stopping: bool = True  # stop trials that cannot reach the front (state PRUNED)
    refine: int = 4  # front members given a longer distillation after the budget (0: none)
    refine_epochs: int | None = None  # None: twice the space's longest fine-tune, at least 12
    refine_timeout_s: float = 600.0  # no refinement starts later than this after the budget
    batch_size: int | None = None  # inputs per inference latency is for (None: the profile's)
    max_failures: int | None = None  # failed trials before the study stops (None: max(10, budget))

    def task_options(self) -> TaskOptions:
        """What the task factory gets besides the seed."""
        from search.tasks import TaskOptions

        return TaskOptions(
            data_dir=Path(self.data_dir) if self.data_dir is not None else None,
            arch=self.arch,
            teacher=Path(self.teacher) if self.teacher is not None else None,
            image_size=self.image_size,
            teacher_epochs=self.teacher_epochs,
            sparse_init=Path(self.sparse_init) if self.sparse_init is not None else None,
        )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming each bad setting (and its flag) and what is allowed.

        The rules are :class:`Settings`' (the same a config file is checked against).
        """
        given = ((f.name, getattr(self, f.name)) for f in fields(self) if f.name in Settings.model_fields)
        values = {k: str(v) if isinstance(v, Path) else v for k, v in given if v is not None}
        try:
            Settings.model_validate(values)
        except ValidationError as exc:
            lines = [f"{_setting(e['loc'][0] if e['loc'] else '')}: "
                     f"{e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})"
                     for e in exc.errors()]
            raise ConfigError("invalid setting" + ("s:\n  " if len(lines) > 1 else " ")
                              + "\n  ".join(lines)) from None

    @property
    def report_drop(self) -> float:
        """The accuracy drop the best speedup is reported within."""
        return REPORT_DROP if self.max_accuracy_drop is None else self.max_accuracy_drop

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


Count = Annotated[StrictInt, Field(ge=1)]  # a whole number: true is not 1


class Settings(Strict):
    """Every setting's rule, declared once: a config file (``search --config F``, the flags'
    names in snake_case, all optional) is checked against it when read, and so is what the
    flags, the file and the defaults resolve to (:meth:`SearchConfig.validate`), whoever
    built it.

    Flags typed on the command line beat the file, which beats the defaults.
    """

    profile: str | None = None
    budget: Count | None = None
    task: str | None = None
    space: str | None = None
    study_name: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    experiment_name: str | None = None
    output_dir: str | None = None
    ray_address: str | None = None
    seed: Annotated[StrictInt, Field(ge=0)] | None = None
    sampler: SamplerName | None = None
    parallel: Count | None = None
    max_accuracy_drop: float | None = Field(default=None, ge=0)
    max_latency_ms: float | None = Field(default=None, gt=0)
    latency: LatencyMode | None = None
    grace_period_s: float | None = Field(default=None, ge=0)
    data_dir: str | None = None
    arch: str | None = None
    teacher: str | None = None
    image_size: Annotated[StrictInt, Field(ge=8, le=1024)] | None = None
    teacher_epochs: Count | None = None
    sparse_init: str | None = None
    early_stopping: bool | None = None
    refine: Annotated[StrictInt, Field(ge=0)] | None = None
    refine_epochs: Count | None = None
    refine_timeout_s: float | None = Field(default=None, ge=0)
    batch_size: Annotated[StrictInt, Field(ge=1, le=4096)] | None = None
    max_failures: Count | None = None

    @field_validator("study_name")
    @classmethod
    def _study_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError("use letters, digits, '.', '_' or '-', starting with a letter or "
                             "digit, at most 128 characters")
        return value

    @field_validator("experiment_name")
    @classmethod
    def _experiment_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value


ConfigFile = Settings  # what a config file is validated as (the name its errors carry)


def load_config_file(path: Path) -> dict[str, object]:
    """The settings a config file gives (only those it names).

    Relative ``data_dir`` / ``teacher`` paths are relative to the file, so an
    experiment file works from any directory.
    """
    path = Path(path)
    values = load_model(Settings, path).model_dump(exclude_none=True)
    for key in ("data_dir", "teacher", "sparse_init"):
        if key in values:
            p = Path(str(values[key])).expanduser()
            values[key] = p if p.is_absolute() else path.parent / p
    return values
