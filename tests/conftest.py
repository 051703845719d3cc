"""Shared fixtures: the real digits task (teacher trained once, cached) and a fast profile."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from search.compress import compressible_layers
from search.profiles import PROFILES_DIR, load_profile
from search.tasks import load_task


@pytest.fixture(scope="session")
def task():
    return load_task("digits", 0)


@pytest.fixture(scope="session")
def layers(task):
    return compressible_layers(task.teacher())


@pytest.fixture(scope="session")
def profile():
    return load_profile("cpu-avx512-vnni")


def fast_profile_file() -> Path:
    """The host profile with shorter measurements, written where a user's profile would be."""
    import tempfile

    data = yaml.safe_load((PROFILES_DIR / "cpu-avx512-vnni.yaml").read_text())
    data["name"] = "fast-host"
    data["measure"].update(warmup_runs=5, min_runs=20, min_time_s=0.2)
    text = yaml.safe_dump(data)
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]  # checkouts with other profiles differ
    path = Path(tempfile.gettempdir()) / "search-tests" / f"fast-host-{digest}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def fast_profile_path() -> Path:
    return fast_profile_file()


@pytest.fixture(scope="session")
def fast_profile(fast_profile_path):
    return load_profile(fast_profile_path)
