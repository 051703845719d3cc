"""The bundled digits data: read without scikit-learn's import, split as scikit-learn splits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from search._base.paths import cache_dir
from search.tasks import digits


def test_the_data_is_scikit_learns_digits():
    raw, target = digits._load_digits()
    reference = load_digits()
    np.testing.assert_array_equal(raw, reference.images)
    np.testing.assert_array_equal(target, reference.target)


def test_the_split_is_scikit_learns_stratified_split_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path))
    target = load_digits().target
    train, rest = train_test_split(np.arange(len(target)), test_size=0.4, random_state=3,
                                   stratify=target)
    val, test = train_test_split(rest, test_size=0.5, random_state=3, stratify=target[rest])
    first = digits._splits(3)
    kept = list(tmp_path.glob("digits-split-3-*.npz"))
    assert len(kept) == 1
    again = digits._splits(3)  # read back from the file
    for made, read, index in zip(first[:3], again[:3], (train, val, test), strict=True):
        assert torch.equal(made.x, read.x) and torch.equal(made.y, read.y)
        np.testing.assert_array_equal(made.y.numpy(), target[index])
    kept[0].write_bytes(b"not an npz")  # a damaged file is computed again, not trusted
    assert torch.equal(digits._splits(3)[0].x, first[0].x)


def test_a_second_load_does_not_import_scikit_learn(tmp_path):
    for teacher in cache_dir().glob("digits-teacher-*"):  # the split only: no retraining
        shutil.copy2(teacher, tmp_path / teacher.name)
    code = ("import sys; from search.tasks import load_task; load_task('digits', 0).val; "
            "print(any(m.startswith('sklearn') for m in sys.modules))")
    env = {**os.environ, "SEARCH_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, timeout=300)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr[-2000:]
    assert [r.stdout.strip() for r in runs] == ["True", "False"]
