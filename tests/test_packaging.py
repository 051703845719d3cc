"""A wheel built from the checkout carries every built-in profile and space, and runs a study.

This is how users install packages and how Ray cluster nodes usually get the
code: not editable, no source tree beside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from search.profiles import PROFILES_DIR, available_profiles
from search.space.schema import SPACES_DIR, available_spaces

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _clean_copy(dest: Path) -> Path:
    """The files a clean clone would have (tracked, or new and not ignored): no build debris."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The project built as a wheel and installed (not editable) into a fresh site directory;
    its dependencies come from this environment."""
    work = tmp_path_factory.mktemp("wheel")
    src = _clean_copy(work / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(work / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (work / "dist").glob("*.whl")
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    return {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1",
            "SEARCH_TEST_SITE": str(site)}


def _run(env: dict[str, str], cwd: Path, *args: str, timeout: int = 60):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_the_wheel_lists_every_builtin_profile_and_space(installed, tmp_path):
    where = _run(installed, tmp_path, "-c", "import search; print(search.__file__)")
    assert where.stdout.strip().startswith(installed["SEARCH_TEST_SITE"]), where
    out = _run(installed, tmp_path, "-m", "search.cli", "profiles")
    assert out.returncode == 0, out.stderr[-2000:]
    builtins = [n for n in available_profiles() if n != "host"]
    assert len(builtins) == len(list(PROFILES_DIR.glob("*.yaml"))) >= 5
    for name in builtins:
        assert name in out.stdout, (name, out.stdout)
    spaces = _run(installed, tmp_path, "-c",
                  "from search.space.schema import available_spaces, load_space; "
                  "print(*available_spaces()); [load_space(s) for s in available_spaces()]")
    assert spaces.returncode == 0, spaces.stderr[-2000:]
    assert spaces.stdout.split() == available_spaces() == sorted(
        p.stem for p in SPACES_DIR.glob("*.yaml"))


def test_the_wheel_runs_a_study_on_a_builtin_profile(installed, tmp_path):
    out = _run(installed, tmp_path, "-m", "search.cli", "--profile", "t4-gpu", "--budget", "2",
               "--latency", "predict", "--refine", "0", "--quiet", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Pareto front" in out.stdout
    assert (tmp_path / "search-runs" / "digits-t4-gpu" / "pareto.csv").is_file()
