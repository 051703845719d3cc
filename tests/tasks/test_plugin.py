"""--task module:function: a user's model and data, through the real command and Ray workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from search._base.errors import ConfigError
from search.tasks import TaskOptions, check_task, load_task
from tests.support.plugins import PLUGIN


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "blobs_task.py").write_text(PLUGIN)
    (folder / "broken_task.py").write_text("raise RuntimeError('no GPU in this plugin')\n")
    return folder


@pytest.fixture
def on_path(plugin_dir, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path / "cache"))
    return plugin_dir


@pytest.mark.parametrize("spec, words", [
    ("nowhere_module:make_task", ["cannot import module 'nowhere_module'", "PYTHONPATH"]),
    ("blobs_task:make_taks", ["has no 'make_taks'", "make_task"]),
    ("blobs_task:NUMBER", ["'NUMBER' is a int, not a function"]),
    ("blobs_task:no_options", ["must accept (seed, options)"]),
    ("broken_task:make_task", ["importing 'broken_task' failed", "no GPU in this plugin"]),
    ("blobs_task:", ["module:function"]),
    ("mnist", ["unknown task 'mnist'", "cifar10, digits, digits-detection, digits-segmentation",
               "module:function"]),
])
def test_bad_task_specs_name_what_is_wrong(on_path, spec, words):
    with pytest.raises(ConfigError) as err:
        check_task(spec)
    for word in words:
        assert word in str(err.value)


def test_a_plugin_returning_the_wrong_type_is_refused(on_path):
    with pytest.raises(ConfigError, match="returned dict; it must return a search.tasks.Task"):
        load_task("blobs_task:not_a_task", 0, TaskOptions())


@pytest.mark.parametrize("factory, words", [
    ("float_labels", ["int64 class labels (float labels with a task loss", "torch.float32 x512"]),
    ("float_labels_no_metric", ["float labels need a metric", "top-1 accuracy is for class"]),
    ("broadcasting_loss", ["its loss failed on the model's output", "target size"]),
])
def test_a_task_that_is_not_classification_needs_its_loss_and_metric(on_path, factory, words):
    """Float labels are regression: refused without the task's loss (cross-entropy cannot
    take them) or without a metric, and a loss that broadcasts an (N, 4) output against (N,)
    labels is refused before any trial trains on the wrong target."""
    with pytest.raises(ConfigError) as err:
        load_task(f"blobs_task:{factory}", 0, TaskOptions())
    for word in words:
        assert word in str(err.value)


def test_plugin_task_gets_scored_and_takes_a_teacher_file(on_path, tmp_path):
    import torch

    task = load_task("blobs_task:make_task", 0, TaskOptions(teacher_epochs=2))
    assert task.teacher_info["test_accuracy"] > 60  # the data is learnable
    # --teacher applies to plugins too: the file's weights replace the trained ones
    other = task.make_model()
    path = tmp_path / "mine.pt"
    torch.save(other.state_dict(), path)
    mine = load_task("blobs_task:make_task", 0, TaskOptions(teacher_epochs=2, teacher=path))
    assert mine.teacher_info["teacher"] == str(path)
    for key, value in other.state_dict().items():
        assert torch.equal(mine.teacher_state[key], value)


def test_a_one_file_plugin_travels_to_ray_workers_by_value(on_path, tmp_path):
    """A cluster's workers need not have the user's module: its functions are pickled whole."""
    from ray import cloudpickle

    check_task("blobs_task:make_task")
    blob = cloudpickle.dumps(sys.modules["blobs_task"].make_model)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", "import pickle, sys; print(type(pickle.loads(sys.stdin.buffer"
         ".read())()).__name__)"], input=blob, cwd=tmp_path, env=env, capture_output=True,
        timeout=120)
    assert out.returncode == 0 and out.stdout.decode().strip() == "Sequential", out.stderr[-2000:]


def test_plugin_study_runs_on_ray_workers(plugin_dir, tmp_path, fast_profile_path, monkeypatch,
                                         capsys):
    """The command, in this process, on the session's warm Ray: its workers were started
    without the plugin's folder on their path, so the one-file plugin reaches them by value."""
    from search.cli import main

    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(["--task", "blobs_task:make_task", "--profile", str(fast_profile_path),
                 "--budget", "2", "--teacher-epochs", "3", "--quiet"])
    stderr = capsys.readouterr().err
    assert code == 0, stderr[-3000:]
    study = tmp_path / "search-runs" / "blobs_task.make_task-fast-host"
    trials = pd.read_csv(study / "trials.csv")
    assert (trials["state"] == "COMPLETE").sum() == 2
    assert trials["accuracy"].min() > 60
    config = (study / "config.yaml").read_text()
    assert "task: blobs_task:make_task" in config and "teacher_epochs: 3" in config
    assert "teacher: test accuracy" in stderr
    from mlflow.tracking import MlflowClient

    from search.results.tracking import EXPERIMENT

    client = MlflowClient(f"sqlite:///{tmp_path / 'search-runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id],
                                 filter_string="params.task = 'blobs_task:make_task'")
    assert len(parents) == 1 and parents[0].data.params["teacher_epochs"] == "3"
