"""--task cifar10 reads a local copy and never downloads; a missing one fails at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from search.errors import ConfigError
from search.tasks import TaskOptions, check_task, load_task

REPO = Path(__file__).resolve().parents[2]


def test_missing_data_dir_exits_2_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SEARCH_CACHE_DIR": str(tmp_path / "cache")}
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "search.cli", "--task", "cifar10", "--data-dir",
                          "missing/", "--profile", "cpu-avx512-vnni", "--budget", "2"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--data-dir missing does not exist" in out.stderr
    assert "cifar-10-batches-py/" in out.stderr and "nothing is downloaded" in out.stderr
    assert list(work.iterdir()) == [] and not (tmp_path / "cache").exists()


def test_incomplete_and_corrupt_copies_are_named(tmp_path):
    with pytest.raises(ConfigError, match="needs --data-dir"):
        check_task("cifar10", TaskOptions())
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(ConfigError) as err:
        check_task("cifar10", TaskOptions(data_dir=tmp_path))
    assert "missing cifar-10-batches-py/data_batch_2" in str(err.value)
    assert "cifar-10-batches-py/data_batch_1" not in str(err.value).split("expected")[0]
    for name in [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch", "batches.meta"]:
        (batches / name).write_bytes(b"junk")
    with pytest.raises(ConfigError, match="corrupted or incomplete"):
        load_task("cifar10", 0, TaskOptions(data_dir=tmp_path))
