"""The command as a user types it: bad input fails fast, with exit 2 and nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

SEARCH = [sys.executable, "-m", "search.cli"]


def _run(args, cwd: Path, timeout=120):
    return subprocess.run(SEARCH + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_unknown_profile_lists_known_profiles_and_writes_nothing(tmp_path):
    out = _run(["--profile", "tpu-v9", "--budget", "3"], tmp_path)
    assert out.returncode == 2
    assert "tpu-v9" in out.stderr and "cpu-avx512-vnni" in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("budget", ["0", "-4", "2.5", "many"])
def test_bad_budget_is_rejected(tmp_path, budget):
    out = _run(["--profile", "cpu-avx512-vnni", "--budget", budget], tmp_path)
    assert out.returncode == 2
    assert "--budget" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_dir_fails_before_any_trial(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = _run(["--profile", "cpu-avx512-vnni", "--budget", "3", "--output-dir",
                str(blocker / "runs")], tmp_path)
    assert out.returncode == 2
    assert "output directory" in out.stderr and "cannot be written" in out.stderr
    assert not (tmp_path / "search-runs" / "optuna.db").exists()


def test_unknown_space_lists_known_spaces(tmp_path):
    out = _run(["--profile", "cpu-avx512-vnni", "--budget", "3", "--space", "nope"], tmp_path)
    assert out.returncode == 2 and "default" in out.stderr
