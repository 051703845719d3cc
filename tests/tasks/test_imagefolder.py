"""--task imagefolder: a user's image folders, any torchvision architecture."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from search._base.errors import ConfigError
from search._base.paths import cache_dir
from search.tasks import TaskOptions, check_task
from tests.support.helpers import done_rows
from tests.support.plugins import write_digits_tree

REPO = Path(__file__).resolve().parents[2]
SEARCH = [sys.executable, "-m", "search.cli"]


def _run(args, cwd: Path, cache: Path, timeout=900):
    env = {**os.environ, "SEARCH_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run(SEARCH + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_mobilenet_v2_study_on_an_image_folder(tmp_path, fast_profile_path, monkeypatch):
    """The command in this process, on the session's warm Ray (how Ray starts is not the
    subject): 200 images at 32x32, one teacher epoch, the two baselines."""
    from search.cli import main

    tree = write_digits_tree(tmp_path / "data", {"train": 12, "val": 8}, side=16)
    monkeypatch.chdir(tmp_path)
    code = main(["--task", "imagefolder", "--arch", "mobilenet_v2", "--data-dir", str(tree),
                 "--image-size", "32", "--teacher-epochs", "1", "--profile",
                 str(fast_profile_path), "--budget", "2", "--refine", "0", "--quiet"])
    assert code == 0
    study = tmp_path / "search-runs" / "imagefolder-mobilenet_v2-fast-host"
    trials = pd.read_csv(study / "trials.csv")
    assert len(done_rows(trials)) == 2
    # MobileNetV2 has 53 convolutions and linears, each with its own precision
    assert trials.loc[trials["baseline"] == "int8", "precisions"].iloc[0] == "int8:53"
    assert list(cache_dir().glob("imagefolder-mobilenet_v2-teacher-*.pt"))
    config = (study / "config.yaml").read_text()
    assert "arch: mobilenet_v2" in config and f"data_dir: {tree}" in config


def test_an_image_folder_without_images_fails_before_writing(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split / "cat").mkdir(parents=True)
        (data / split / "cat" / "notes.txt").write_text("not an image")
    work = tmp_path / "work"
    work.mkdir()
    out = _run(["--task", "imagefolder", "--data-dir", str(data), "--profile", "cpu-avx512-vnni",
                "--budget", "2"], work, tmp_path / "cache", timeout=120)
    assert out.returncode == 2
    assert f"--data-dir {data}: train/ has no class folder with images" in out.stderr
    assert "DIR/train/<class>/<image>" in out.stderr
    assert list(work.iterdir()) == []


def _layout_error(data: Path, **options) -> str:
    with pytest.raises(ConfigError) as err:
        check_task("imagefolder", TaskOptions(data_dir=data, **options))
    return str(err.value)


def test_layout_errors_say_what_is_expected(tmp_path, digits_tree):
    assert "needs --data-dir" in _layout_error(None)
    assert "does not exist" in _layout_error(tmp_path / "nope")
    data = tmp_path / "copy"
    shutil.copytree(digits_tree, data)
    shutil.rmtree(data / "val" / "7")
    message = _layout_error(data)
    assert "val/ and train/ have different classes" in message and "['7']" in message
    shutil.rmtree(data / "val")
    assert "has no val/ folder" in _layout_error(data)
    assert "unknown --arch 'resnet19'" in _layout_error(digits_tree, arch="resnet19")
    check_task("imagefolder", TaskOptions(data_dir=digits_tree, arch="mobilenet_v2"))


def test_a_test_folder_is_used_when_present_and_val_is_halved_otherwise(tmp_path):
    from search.tasks._data import split_stratified
    from search.tasks.imagefolder import _read

    data = write_digits_tree(tmp_path / "d", {"train": 3, "val": 2, "test": 1}, side=8, classes=3)
    check_task("imagefolder", TaskOptions(data_dir=data))
    val = _read(data / "val", 8)
    assert tuple(val.x.shape) == (6, 3, 8, 8) and sorted(val.y.tolist()) == [0, 0, 1, 1, 2, 2]
    first, second = split_stratified(val, 0.5)
    assert sorted(first.y.tolist()) == sorted(second.y.tolist()) == [0, 1, 2]
