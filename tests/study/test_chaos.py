"""Processes killed and resources lost mid-study: nothing completed is lost or doubled.

Trials are slowed with the fault hook (``SEARCH_FAULTS=prune@*+SECONDS``, see
search/_base/faults.py: the driver sends it with each task) so that a kill lands mid-trial.
Studies whose subject is not how the driver starts Ray run on the session's warm Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from search._base.attrs import failure_reason
from search.config import SearchConfig
from search.results.tracking import EXPERIMENT
from search.study.run import run_search
from tests.support.helpers import QUICK_SPACE, skip_unless_ci
from tests.support.servers import free_port, start_mlflow_server, stop_mlflow_server

pytestmark = pytest.mark.slow

SPACE = QUICK_SPACE
COMPLETE, RUNNING, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                           optuna.trial.TrialState.FAIL)


def _trials(storage: str, name: str, *states) -> list[optuna.trial.FrozenTrial]:
    """The study's trials in ``states``; raises when the study is not there."""
    return optuna.load_study(study_name=name, storage=storage).get_trials(states=states or None)


def _trials_so_far(storage: str, name: str, *states) -> list[optuna.trial.FrozenTrial]:
    """For polling while a driver starts: [] until the study exists, while SQLite is
    locked for a moment or while the driver creates its tables; any other error raises."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    try:
        return _trials(storage, name, *states)
    except (KeyError, OperationalError, IntegrityError):
        return []


def _wait(condition, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"driver exited early ({proc.returncode}): "
                        f"{proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``, from /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append((int(entry.name), cmd.strip()))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child[0])
    return found


def _children_runs(tracking: str, started: bool = True) -> tuple[list, list]:
    """The study's parent run and its children; with ``started=False`` ([], []) while the
    driver has created the experiment but not yet its parent run."""
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents and not started:
        return [], []
    assert len(parents) == 1
    return parents, [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                     == parents[0].info.run_id]


def _assert_mlflow_matches(tracking: str, storage: str, name: str) -> None:
    """One ended child run per finished trial, none doubled, COMPLETE ones with metrics."""
    _, children = _children_runs(tracking)
    numbers = [int(c.data.tags["search.trial"]) for c in children]
    assert len(numbers) == len(set(numbers)), sorted(numbers)
    finished = {t.number: t for t in _trials(storage, name, COMPLETE, FAIL)}
    assert sorted(numbers) == sorted(finished)
    for child in children:
        trial = finished[int(child.data.tags["search.trial"])]
        assert child.info.status == ("FINISHED" if trial.state == COMPLETE else "FAILED")
        assert child.data.tags["state"] == trial.state.name
        if trial.state == COMPLETE:
            assert child.data.metrics["accuracy"] == pytest.approx(trial.values[0])


def _command(profile: Path, budget: int, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "search.cli", "--profile", str(profile), "--budget",
            str(budget), "--space", "quick.yaml", "--study-name", name, "--quiet", *extra]


@pytest.fixture
def slow_trials(tmp_path, monkeypatch):
    (tmp_path / "quick.yaml").write_text(SPACE)
    monkeypatch.setenv("SEARCH_FAULTS", "prune@*+1.5")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_ray_workers_killed_mid_trial_still_end_with_the_budget(slow_trials, fast_profile_path):
    """SIGKILL two screen workers and one measure worker while they run a trial's task (each
    checked to be still running it just before the kill): Ray retries the task, or the trial
    FAILs with that stage named and another is asked; the budget is met exactly. The screen
    stage is slowed by 1.5 s (the fault hook) and each measurement lasts at least 1.2 s (the
    profile), so that the measure kill lands while ONNX Runtime is timing the model."""
    import yaml

    profile = yaml.safe_load(fast_profile_path.read_text())
    # same name: the warm Ray's device resource; one side-by-side round, as each of its
    # measurements lasts 1.2 s too
    profile["measure"].update(min_time_s=1.2, side_by_side_rounds=1)
    long_measure = slow_trials / "fast-host.yaml"
    long_measure.write_text(yaml.safe_dump(profile))
    killed: list[str] = []
    stop = threading.Event()
    plan = ["ray::screen", "ray::screen", "ray::measure"]
    into = {"ray::screen": 0.5, "ray::measure": 0.6}  # well into the slowdown / the timing

    def killer() -> None:
        seen: set[int] = set()
        while plan and not stop.is_set():
            for pid, cmd in _descendants(os.getpid()):
                if cmd.startswith(plan[0]) and pid not in seen:
                    seen.add(pid)
                    time.sleep(into[plan[0]])
                    if not _cmdline(pid).startswith(plan[0]):
                        seen.discard(pid)  # it finished first: no interruption; its next task
                        break
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        break
                    killed.append(plan.pop(0))
                    break
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        config = SearchConfig(profile=str(long_measure), budget=3, runs_root=slow_trials,
                              space="quick.yaml", study_name="worker-kill", parallel=1,
                              refine=0)  # refinement is not what a kill tests
        result = run_search(config, show_progress=False)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert killed == ["ray::screen", "ray::screen", "ray::measure"]
    storage = f"sqlite:///{slow_trials / 'optuna.db'}"
    assert len(_trials(storage, "worker-kill", COMPLETE)) == 3 == len(result.trials)
    for t in _trials(storage, "worker-kill", FAIL):  # a retry that was killed again
        stage, _, why = t.user_attrs["failure"].partition(": ")
        assert stage in ("screen", "measure") and "WorkerCrashedError" in why, t.user_attrs
    assert result.trials["latency_ms"].notna().all()  # every kept trial was measured in full
    _assert_mlflow_matches(result.tracking_uri, storage, "worker-kill")


def _alive(pid: int) -> bool:
    """Running: a zombie (exited, not yet reaped by whoever inherited it) has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# Ray's per-node agents, which notice their raylet's death only after 10 s or more
_LINGERING = ("DashboardAgent", "RuntimeEnvAgent", "dashboard/agent.py", "runtime_env/agent")


def _kill_driver(proc: subprocess.Popen) -> None:
    """kill -9 the driver; Ray's processes below it (GCS, raylet, workers) must notice and
    go (10 s). Its agents, which linger, are killed once the rest has gone."""
    below = _descendants(proc.pid)
    proc.kill()
    proc.communicate(timeout=60)
    core = [(p, cmd) for p, cmd in below if not any(name in cmd for name in _LINGERING)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p, _ in core):
        time.sleep(0.2)
    survivors = [(p, cmd) for p, cmd in core if _alive(p)]
    for pid, _ in below:  # never leak them into the machine
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if survivors:  # Ray's doing, not the study's: say so without failing
        import warnings

        warnings.warn(f"Ray processes outlived their SIGKILLed driver by 10 s: {survivors}",
                      stacklevel=2)


def test_ctrl_c_then_kill_9_then_rerun_ends_with_exactly_the_budget(slow_trials,
                                                                     fast_profile_path, capsys):
    """The same command, again and again: stopped with Ctrl-C (SIGINT: exit 130, saying how
    to resume), then with kill -9 while a trial runs (a copy started while that one holds
    the study exits 2 and changes nothing), then run to the end. The killed driver is a
    separate process that starts a Ray of its own (which the kill must take down with it);
    the first and last run in this process on the session's warm Ray (Ctrl-C is delivered
    to this process's main thread, where the driver runs). Nothing completed is lost,
    changed or logged twice; the trial the killed driver left RUNNING is FAILED with the
    reason and retried."""
    from search.cli import main

    storage = f"sqlite:///{slow_trials / 'search-runs' / 'optuna.db'}"
    cmd = _command(fast_profile_path, 6, "resume", "--grace-period", "20", "--refine", "0")

    def complete() -> dict[int, tuple]:
        return {t.number: (t.values, t.params)
                for t in _trials_so_far(storage, "resume", COMPLETE)}

    returned = threading.Event()  # no Ctrl-C for pytest itself once the command is over

    def ctrl_c_after_two_trials() -> None:
        while len(complete()) < 2 and not returned.is_set():
            time.sleep(0.3)
        if not returned.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    capsys.readouterr()
    interrupter = threading.Thread(target=ctrl_c_after_two_trials, daemon=True)
    interrupter.start()
    try:
        code = main(cmd[3:])
    finally:
        returned.set()
        interrupter.join(timeout=10)
    assert code == 130
    err = capsys.readouterr().err
    assert "Rerun the same command" in err, err[-3000:]
    first = complete()
    assert 2 <= len(first) < 6 and not _trials(storage, "resume", RUNNING)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: len(complete()) > len(first), 300, proc)
    # while that driver holds the study, the same command in this process is refused and
    # changes nothing
    capsys.readouterr()
    assert main(cmd[3:]) == 2
    assert "already being run by another driver" in capsys.readouterr().err
    assert proc.poll() is None  # refused because the other held it, not after it ended
    _wait(lambda: bool(_trials_so_far(storage, "resume", RUNNING)), 300, proc)
    _kill_driver(proc)
    second = complete()
    stale = [t.number for t in _trials(storage, "resume", RUNNING)]
    assert len(second) < 6 and stale
    assert all(second[n] == first[n] for n in first)

    assert main(cmd[3:]) == 0  # the rerun: the same command, to the end
    out = capsys.readouterr().out
    assert "Pareto front" in out and "mlflow ui --backend-store-uri" in out  # as a user reads it
    after = complete()
    assert len(after) == 6 and all(after[n] == second[n] for n in second)
    failed = {t.number: t for t in _trials(storage, "resume", FAIL)}
    assert set(stale) <= set(failed)
    assert all(failure_reason(failed[n]) == "driver stopped mid-trial" for n in stale)
    assert not _trials(storage, "resume", RUNNING)
    tracking = f"sqlite:///{slow_trials / 'search-runs' / 'mlflow.db'}"
    _assert_mlflow_matches(tracking, storage, "resume")
    rows = pd.read_csv(slow_trials / "search-runs" / "resume" / "trials.csv")
    assert sorted(rows.loc[rows["state"] == "COMPLETE", "trial"]) == sorted(after)


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    if os.geteuid() != 0:
        skip_unless_ci("a size-limited tmpfs needs root (mount -t tmpfs)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        skip_unless_ci(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def test_disk_full_stops_clearly_and_a_rerun_finishes(slow_trials, fast_profile_path, capsys):
    """The output directory (models, CSVs, plots) is on an 8 MB tmpfs that fills mid-study
    (from another thread, while the command runs in this process on the session's warm Ray);
    the Optuna storage and MLflow store are on another disk."""
    from search.cli import main

    small = slow_trials / "small"
    _mount_tmpfs(small, "8m")
    try:
        storage = f"sqlite:///{slow_trials / 'search-runs' / 'optuna.db'}"
        args = _command(fast_profile_path, 4, "full", "--output-dir", str(small / "out"),
                        "--refine", "0")[3:]
        filled: list[Path] = []

        def fill_after_two_trials() -> None:
            deadline = time.monotonic() + 300
            while len(_trials_so_far(storage, "full", COMPLETE)) < 2 \
                    and time.monotonic() < deadline:
                time.sleep(0.3)
            filled.append(_fill(small))

        filler = threading.Thread(target=fill_after_two_trials, daemon=True)
        filler.start()
        capsys.readouterr()
        assert main(args) == 1
        filler.join(timeout=60)
        err = capsys.readouterr().err
        assert filled, "the disk was not filled"
        assert "No space left on device" in err and "rerun the same command" in err, err[-3000:]
        assert "Traceback" not in err
        before = {t.number: t.values for t in _trials(storage, "full", COMPLETE)}
        assert 2 <= len(before) < 4

        assert main(args) == 2  # still full
        assert "cannot be written" in capsys.readouterr().err

        filled[0].unlink()
        assert main(args) == 0, capsys.readouterr().err[-3000:]
        after = {t.number: t.values for t in _trials(storage, "full", COMPLETE)}
        assert len(after) == 4 and all(after[n] == v for n, v in before.items())
        rows = pd.read_csv(small / "out" / "trials.csv")
        assert (rows["state"] == "COMPLETE").sum() == 4
        for name in ("pareto.csv", "pareto.html", "summary.md"):
            assert (small / "out" / name).stat().st_size > 0
        for n in after:
            assert (small / "out" / "models" / f"trial-{n}.onnx").stat().st_size > 0
        _assert_mlflow_matches(f"sqlite:///{slow_trials / 'search-runs' / 'mlflow.db'}",
                               storage, "full")
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_tracking_server_restarted_mid_study(slow_trials, fast_profile_path, monkeypatch,
                                             capsys):
    """A real mlflow server (SQLite backend) is killed after the first trial is logged and
    started again two trials later, while the command runs in this process; the trials wait
    at a gate (the fault hook) during the restart, so that a slow restart on a loaded machine
    cannot outlast the study. MLflow ends complete and exact."""
    from search.cli import main

    port = free_port()
    root = slow_trials / "server"
    servers = [start_mlflow_server(root, port)]
    tracking = f"http://127.0.0.1:{port}"
    storage = f"sqlite:///{slow_trials / 'search-runs' / 'optuna.db'}"
    gate = slow_trials / "gate"
    # slowed a little, so that the outage thread sees each trial logged before the next
    monkeypatch.setenv("SEARCH_FAULTS", f"prune@*+0.8,prune@*?{gate}")
    errors: list[BaseException] = []

    def logged() -> int:
        from mlflow.exceptions import MlflowException

        try:
            return len(_children_runs(tracking, started=False)[1])
        except (MlflowException, AttributeError):  # no experiment yet (None), or down
            return 0

    def outage() -> None:
        try:
            _wait(lambda: logged() >= 1, 300)
            stop_mlflow_server(servers[0])
            down_at = len(_trials(storage, "outage", COMPLETE))
            _wait(lambda: len(_trials_so_far(storage, "outage", COMPLETE)) >= down_at + 2,
                  300)
            gate.touch()
            try:
                servers.append(start_mlflow_server(root, port))
            finally:
                gate.unlink()
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    helper = threading.Thread(target=outage, daemon=True)
    try:
        helper.start()
        capsys.readouterr()
        code = main(_command(fast_profile_path, 5, "outage", "--tracking-uri", tracking,
                             "--refine", "0")[3:])
        helper.join(timeout=60)
        err = capsys.readouterr().err
        assert not errors, errors
        assert len(servers) == 2, "the study ended before the server was back"
        assert code == 0, err[-3000:]
        assert "unreachable" in err or "logged later" in err
        assert len(_trials(storage, "outage", COMPLETE)) == 5
        _assert_mlflow_matches(tracking, storage, "outage")
        parents, _ = _children_runs(tracking)
        client = MlflowClient(tracking)
        assert parents[0].info.status == "FINISHED"
        assert "pareto.csv" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    finally:
        gate.unlink(missing_ok=True)
        for server in servers:
            stop_mlflow_server(server)
