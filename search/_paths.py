"""Where the project keeps what it caches between runs."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$SEARCH_CACHE_DIR`` or ``~/.cache/hw-search``: trained teachers, latency calibrations."""
    root = os.environ.get("SEARCH_CACHE_DIR") or Path.home() / ".cache" / "hw-search"
    return Path(root)
