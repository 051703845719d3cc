"""--teacher: a user's weights, checked against the task's model with errors that name keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from search._base.errors import ConfigError
from search.tasks import TaskOptions, check_task, load_teacher_state


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _error(path: Path, model: nn.Module | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_teacher_state(path, model or _model())
    return str(err.value)


@pytest.mark.parametrize("wrap", ["state", "module", "checkpoint", "data_parallel"])
def test_state_dicts_modules_and_checkpoints_load(tmp_path, wrap):
    source = _model()
    state = source.state_dict()
    saved = {"state": state, "module": source, "checkpoint": {"epoch": 3, "state_dict": state},
             "data_parallel": {f"module.{k}": v for k, v in state.items()}}[wrap]
    path = tmp_path / "t.pt"
    torch.save(saved, path)
    loaded = load_teacher_state(path, _model())
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_mismatched_keys_and_shapes_are_listed(tmp_path):
    state = _model().state_dict()
    state.pop("3.bias")
    state["head.weight"] = torch.zeros(2)
    state["0.weight"] = torch.zeros(8, 1, 3, 3)
    path = tmp_path / "t.pt"
    torch.save(state, path)
    message = _error(path)
    assert f"teacher {path} does not fit the task's model (Sequential)" in message
    assert "missing keys: 3.bias" in message
    assert "unexpected keys: head.weight" in message
    assert "shape mismatches: 0.weight (8, 1, 3, 3) (model: (4, 1, 3, 3))" in message


@pytest.mark.parametrize("content, words", [
    (b"\x00\x01 not a checkpoint", ["is not a readable PyTorch checkpoint"]),
    (b"", ["is not a readable PyTorch checkpoint"]),
])
def test_corrupt_files_are_refused(tmp_path, content, words):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    message = _error(path)
    assert all(w in message for w in words) and str(path) in message


def test_truncated_and_wrong_objects_are_refused(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(_model().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    assert "not a readable PyTorch checkpoint" in _error(path)
    torch.save([1, 2, 3], path)
    assert "holds a list; expected a state_dict" in _error(path)
    assert "does not exist" in _error(tmp_path / "nope.pt")


def test_a_missing_teacher_fails_before_the_task_is_built(tmp_path):
    with pytest.raises(ConfigError, match="teacher .*nope.pt does not exist"):
        check_task("digits", TaskOptions(teacher=tmp_path / "nope.pt"))


def test_cli_corrupt_teacher_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"garbage")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-m", "search.cli", "--teacher", str(bad), "--profile",
                          "cpu-avx512-vnni", "--budget", "2"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"teacher {bad} is not a readable PyTorch checkpoint" in out.stderr
    assert list(work.iterdir()) == []


def test_digits_teacher_mismatch_names_keys(tmp_path):
    """A ResNet-18 checkpoint given to the bundled DigitsResNet: refused with its keys."""
    from search.tasks import build_arch
    from search.tasks.digits import DigitsResNet

    path = tmp_path / "r18.pt"
    torch.save(build_arch("resnet18", 10, 1, 32).state_dict(), path)
    message = _error(path, DigitsResNet())
    assert "(DigitsResNet)" in message and "missing keys: fc.bias" not in message
    assert "missing keys: layer1.bn1.bias" in message and "unexpected keys: bn1.bias" in message
    assert "shape mismatches: fc.weight (10, 512) (model: (10, 128))" in message


TRAINER = '''
import sys, time
import torch
from torch import nn
from search.tasks import cached_teacher

def train():
    with open(sys.argv[1], "a") as log:
        log.write("trained\\n")
    time.sleep(1.0)  # long enough for the other process to find the cache still missing
    torch.manual_seed(int(sys.argv[2]))
    return nn.Linear(64, 8)

print("go", flush=True)
sys.stdin.readline()  # both processes start together
state, info = cached_teacher("tiny", {"version": 1}, train)
torch.save(state, sys.argv[3])
print(info["trained_s"])
'''


def test_two_processes_share_one_teacher(tmp_path):
    """Two processes miss the cache at once: one trains, the other waits and reads its file."""
    env = {**os.environ, "SEARCH_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    counter = tmp_path / "trained.txt"
    procs = [subprocess.Popen([sys.executable, "-c", TRAINER, str(counter), str(seed),
                               str(tmp_path / f"out{seed}.pt")],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "go"
    for proc in procs:
        proc.stdin.write("\n")
        proc.stdin.flush()
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert counter.read_text() == "trained\n"
    assert sorted(float(out.strip()) > 0 for out, _ in outs) == [False, True]
    first, second = (torch.load(tmp_path / f"out{s}.pt", weights_only=True) for s in (1, 2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    cached = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert len(cached) == 1 and cached[0].startswith("tiny-teacher-")  # no temporary file left


def test_an_unreadable_cache_file_is_trained_again(tmp_path, monkeypatch):
    from search.tasks import cached_teacher

    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path))
    state, info = cached_teacher("tiny", {"v": 2}, lambda: nn.Linear(2, 2))
    path = Path(info["cache"])
    path.write_bytes(path.read_bytes()[:50])
    again, info = cached_teacher("tiny", {"v": 2}, lambda: nn.Linear(2, 2))
    assert info["trained_s"] > 0 and set(again) == set(state)
    assert torch.load(path, weights_only=True).keys() == again.keys()
def make_chance_task(seed: int, options: TaskOptions):
    """An untrained teacher on random labels: a teacher that learned nothing (a plugin)."""
    from search.tasks import Split, Task

    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        return Split(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen))

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(10.0))  # always class 9: 10 % on balanced labels
    return Task(name="chance", make_model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
                teacher_state=model.state_dict(), train=split(200), val=split(200),
                test=split(200), input_shape=(1, 8, 8), num_classes=10)


def test_a_teacher_near_chance_is_flagged(caplog):
    from search.tasks import load_task, near_chance

    assert near_chance(10.0, 10) and near_chance(18.9, 10) and not near_chance(19.1, 10)
    assert near_chance(54.0, 2) and not near_chance(56.0, 2)
    with caplog.at_level("WARNING", logger="search"):
        task = load_task("tests.tasks.test_teacher:make_chance_task", 0)
    assert task.teacher_info["test_accuracy"] < 19
    assert "near chance (10.00% for 10 classes)" in task.teacher_info["warning"]
    assert "near chance" in caplog.text


def test_a_trained_teacher_is_not_flagged(task):
    assert "warning" not in task.teacher_info


def _scored_task(tmp_path: Path, seed: int = 0):
    from search.tasks import Split, Task

    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 1, 3, 3, generator=gen), torch.arange(40) % 2
    weights = tmp_path / "tiny-teacher-abc.pt"
    torch.save(_model().state_dict(), weights)
    return Task(name="tiny", make_model=_model, teacher_state=torch.load(weights), train=Split(x, y),
                val=Split(x[:20], y[:20]), test=Split(x[20:], y[20:]), input_shape=(1, 3, 3),
                num_classes=2, teacher_info={"cache": str(weights)})


def test_teacher_scores_are_kept_next_to_a_cached_teacher_and_redone_when_anything_changes(
        tmp_path):
    import dataclasses
    import json

    from search.tasks import teacher_scores

    task = _scored_task(tmp_path)
    scores = teacher_scores(task)
    teacher = task.teacher()
    assert scores == {"test_accuracy": task.score(teacher, task.test),
                      "val_accuracy": task.score(teacher, task.val)}
    sidecar = tmp_path / "tiny-teacher-abc.pt.scores.json"
    stored = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**stored, "test_accuracy": 12.5}))  # a marker, same key
    assert teacher_scores(task)["test_accuracy"] == 12.5  # read back, not scored again
    other_val = dataclasses.replace(task, val=task.test, test=task.val)  # other data
    assert teacher_scores(other_val)["test_accuracy"] == pytest.approx(scores["val_accuracy"])
    sidecar.write_text(json.dumps({**stored, "test_accuracy": 12.5}))
    os.utime(tmp_path / "tiny-teacher-abc.pt", ns=(1, 1))  # the weights were written again
    assert teacher_scores(task) == scores
    sidecar.write_text("{not json")  # unreadable: scored again and rewritten
    assert teacher_scores(task) == scores and json.loads(sidecar.read_text())["key"]
    mine = dataclasses.replace(task, teacher_info={"teacher": "mine.pt"})  # not cached
    assert teacher_scores(mine) == scores


def test_the_search_seed_does_not_retrain_a_builtin_teacher(task):
    """--seed varies the search; the built-in teacher stands for the user's model."""
    from search.tasks import load_task

    other = load_task("digits", 7)
    assert other.teacher_info["trained_s"] == 0.0  # from the cache, not trained for seed 7
    assert all(torch.equal(other.teacher_state[k], task.teacher_state[k])
               for k in task.teacher_state)


def test_a_cached_teacher_that_no_longer_fits_the_model_is_trained_again(tmp_path, monkeypatch):
    """The model's construction changed under the same key (VGG's pooling on small images
    did): the stale weights are not handed to every trial, they are trained again."""
    from search.tasks._teacher import resolve_teacher

    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path))
    resolve_teacher("tiny", lambda: nn.Linear(2, 2), None, {"v": 3}, lambda: nn.Linear(2, 2))
    state, info = resolve_teacher("tiny", lambda: nn.Linear(4, 2), None, {"v": 3},
                                  lambda: nn.Linear(4, 2))
    assert info["trained_s"] > 0 and state["weight"].shape == (2, 4)
