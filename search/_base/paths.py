"""Where the project keeps what it caches between runs, and where its built-in data lives."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["builtin_dir", "cache_dir", "model_path", "write_atomic"]

_PACKAGE = Path(__file__).resolve().parents[1]  # search/


def cache_dir() -> Path:
    """``$SEARCH_CACHE_DIR`` or ``~/.cache/hw-search``: trained teachers, latency calibrations."""
    root = os.environ.get("SEARCH_CACHE_DIR") or Path.home() / ".cache" / "hw-search"
    return Path(root)


def builtin_dir(name: str) -> Path:
    """The folder of built-in YAML documents ``name`` (``hardware_profiles`` or ``spaces``).

    The repository keeps them at its top level; a wheel carries them inside the
    package as ``search/_builtin/<name>`` (setup.py copies them there at build
    time), so an installed copy finds them without the source tree.
    """
    packaged = _PACKAGE / "_builtin" / name
    if packaged.is_dir():
        return packaged
    return _PACKAGE.parent / name


def model_path(output_dir: Path, trial: int) -> Path:
    """Where a study keeps trial ``trial``'s ONNX model (``<output-dir>/models/trial-N.onnx``)."""
    return Path(output_dir) / "models" / f"trial-{trial}.onnx"


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write(handle)`` into a temporary file of its own beside ``path``, then rename: a
    concurrent reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
