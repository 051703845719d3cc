"""--task cifar10 reads a local copy and never downloads; a missing one fails at once."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from search._base.errors import ConfigError
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


def _fake_copy(root: Path, per_batch: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 copy in the python format, tiny: five training batches and a test batch of
    ``per_batch`` images each, every class in each; returns the test images and labels."""
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(per_batch)]
        with open(batches / name, "wb") as handle:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{i}.png" for i in range(per_batch)]}, handle)
    with open(batches / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    return data, np.asarray(labels)


def test_a_valid_copy_is_read_split_and_scored(tmp_path):
    import torch

    from search.tasks import build_arch

    test_images, test_labels = _fake_copy(tmp_path / "data")
    teacher = tmp_path / "teacher.pt"
    torch.save(build_arch("resnet18", 10, 3, 32).state_dict(), teacher)  # no training here
    task = load_task("cifar10", 0, TaskOptions(data_dir=tmp_path / "data", teacher=teacher))
    assert (len(task.train), len(task.val), len(task.test)) == (90, 10, 20)
    assert task.input_shape == (3, 32, 32) and task.num_classes == 10
    assert sorted(task.val.y.tolist()) == list(range(10))  # one of each class, stratified
    assert task.test.y.tolist() == test_labels.tolist()  # the official test batch, in order
    assert abs(float(task.train.x.mean())) < 0.05  # normalized with the training split's stats
    # pixel (channel 0, row 0, column 1) of the first test image survives the layout change
    ratio = (task.test.x[0, 0, 0, 1] - task.test.x[0, 0, 0, 0]) / (task.test.x[1, 0, 0, 1]
                                                                    - task.test.x[1, 0, 0, 0] + 1e-9)
    expected = (int(test_images[0, 1]) - int(test_images[0, 0])) / (
        int(test_images[1, 1]) - int(test_images[1, 0]) + 1e-9)
    assert float(ratio) == pytest.approx(expected, rel=1e-3)
    assert 0 <= task.teacher_info["test_accuracy"] <= 100


def test_a_batch_that_asks_pickle_for_more_than_arrays_is_refused(tmp_path):
    _fake_copy(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as handle:
        pickle.dump({"data": os.system, "labels": [0]}, handle)  # would call a function on load
    with pytest.raises(ConfigError, match=r"data_batch_3: not a CIFAR-10 batch.*posix.system"):
        load_task("cifar10", 0, TaskOptions(data_dir=tmp_path))
