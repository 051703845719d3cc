"""Loading YAML documents into validated pydantic models, with errors for people.

Profiles, spaces and config files all pass through :func:`load_model` so that a
typo anywhere is reported the same way: the file, the field, what was given and
what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from search._base.errors import ConfigError

__all__ = ["Strict", "load_model", "resolve_builtin", "validate_model"]

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for every schema: unknown keys are errors, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _allowed_fields(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The field names allowed at ``loc`` (the location of an unknown key)."""
    current: Any = cls
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
            # unwrap Optional / containers to the first BaseModel argument
            for arg in getattr(current, "__args__", ()) or ():
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    current = arg
                    break
        # dict keys and list indices keep the current model
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _format(error: ValidationError, cls: type[BaseModel], source: str) -> str:
    lines = [f"{source}: invalid {cls.__name__}"]
    for item in error.errors():
        loc = tuple(item["loc"])
        field = ".".join(str(p) for p in loc) or "(document)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            allowed = _allowed_fields(cls, loc)
            message = "unknown field"
            if allowed is not None:
                message += f"; allowed fields here: {', '.join(allowed)}"
        elif item["type"] == "missing":
            message = "required field is missing"
        else:
            message += f" (got {item.get('input')!r})"
        lines.append(f"  - {field}: {message}")
    return "\n".join(lines)


def validate_model(cls: type[M], data: Any, source: str) -> M:
    """Validate ``data`` as ``cls``; raise :class:`ConfigError` naming ``source``."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of fields for {cls.__name__}, "
            f"got {type(data).__name__}"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, cls, source)) from None


def load_model(cls: type[M], path: Path, overrides: dict[str, Any] | None = None) -> M:
    """Read a YAML file and validate it as ``cls``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if overrides and isinstance(data, dict):
        data = {**data, **overrides}
    return validate_model(cls, data, str(path))


def resolve_builtin(name_or_path: str | Path, directory: Path, kind: str,
                    known: list[str]) -> Path:
    """The YAML file for a built-in ``kind`` by name, or a user's file by path."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        path = directory / f"{text}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown {kind} {text!r}; known {kind}s: {', '.join(known)} "
                              f"(or pass a path to a {kind} YAML file)")
    elif not path.is_file():
        raise ConfigError(f"{kind} file {path} does not exist")
    return path
