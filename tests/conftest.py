"""Shared fixtures: the real digits task (teacher trained once, cached) and a fast profile."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Before torch loads OpenMP (read once, at load): idle OpenMP threads sleep instead of
# spinning. The two test processes, their Ray workers and the drivers they start share two
# cores, where spinning threads burn the time others wait for: two copies of the refinement
# test started together were both done in 105 s and 107 s (two rounds) with the default, in
# 63 s and 59 s with PASSIVE (rounds alternated, this 2-core VM). Every process the suite
# starts inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import yaml  # noqa: E402

from search._base.paths import cache_dir, write_atomic  # noqa: E402
from search.profiles import PROFILES_DIR, load_profile, measurable_here  # noqa: E402
from search.tasks import load_task  # noqa: E402
from search.trial.compress import compressible_layers  # noqa: E402


def _hermetic_cache() -> Path:
    """The suite's own cache directory, so it never reads or writes the user's (latency
    calibrations of one test would otherwise steer the predictions of another, and of the
    user's next study). Seeded with the user's trained teachers (hard links: hundreds of MB
    for a ViT), and the data splits they were trained on, so nothing retrains;
    subprocesses, Ray workers and pytest-xdist's test processes inherit it through the
    environment."""
    import atexit
    import os
    import shutil
    import tempfile

    inherited = Path(os.environ.get("SEARCH_CACHE_DIR", "."))
    if os.environ.get("PYTEST_XDIST_WORKER") and inherited.name.startswith("search-tests-cache-"):
        return inherited  # the controller's: a teacher one test process trains serves the other
    real = cache_dir()
    test_cache = Path(tempfile.mkdtemp(prefix="search-tests-cache-"))
    seeds = ["*-teacher-*.pt", "*-teacher-*.pt.scores.json", "digits-split-*.npz"]
    for found in [path for pattern in seeds for path in real.glob(pattern)]:
        try:  # a link: a teacher is replaced whole (renamed over), never written in place
            os.link(found, test_cache / found.name)
        except OSError:  # another filesystem
            shutil.copy2(found, test_cache / found.name)  # mtime kept: the scores stay valid
    os.environ["SEARCH_CACHE_DIR"] = str(test_cache)
    atexit.register(shutil.rmtree, test_cache, ignore_errors=True)
    return test_cache


TEST_CACHE = _hermetic_cache()


def _hypothesis_home() -> None:
    """Hypothesis keeps its example database and the constants it reads from source in
    ``./.hypothesis``: in the suite's cache instead, so the checkout is left as found."""
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(TEST_CACHE / "hypothesis")


_hypothesis_home()


def _ray_address_file() -> Path:
    """Where ``ray start`` and ray.cluster_utils note the cluster a bare ``ray.init()`` joins."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


_RAY_ADDRESS_BEFORE = _ray_address_file().read_bytes() if _ray_address_file().exists() else None


def pytest_sessionfinish(session):  # noqa: ANN001
    """Leave the machine's current-Ray note as the suite found it: one left by a test's
    cluster (seen after a full run) names a dead cluster, and a user's next bare
    ``ray.init()`` would wait on it for minutes. Done by the controlling process, once every
    test process has finished."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    note = _ray_address_file()
    if _RAY_ADDRESS_BEFORE is None:
        note.unlink(missing_ok=True)
    elif not note.exists() or note.read_bytes() != _RAY_ADDRESS_BEFORE:
        note.write_bytes(_RAY_ADDRESS_BEFORE)


# modules whose tests share nothing and each take minutes: spread over the test processes
_SPREAD = {"test_faults.py", "test_chaos.py"}


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):  # noqa: ANN001, ANN201
    """Under pytest-xdist keep each module's tests on one test process, so that its
    module-scoped study or server is set up once, except the modules in ``_SPREAD``.
    (pytest-xdist's own ``--dist loadgroup`` marks groups by editing node ids, which pytest
    9.2 no longer reads: its groups silently split.)"""
    from xdist.scheduler import LoadScopeScheduling

    class _ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if Path(module).name in _SPREAD else module

    return _ModuleScheduling(config, log)


def pytest_collection_modifyitems(items):
    """The order the test processes take work in (``--no-loadscope-reorder``): tests with a
    Ray of their own first, before any test has started the session's warm Ray (each stops
    it, and the next test that needs it would start it again: seconds, and cold workers that
    import torch), and among them the minute-long ones; then the modules with end-to-end
    studies, so that the longest work starts first and the two test processes end together
    (own-Ray tests last left one process running a minute after the other). Whole modules
    move together, so that a module's shared study is set up once."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.get_closest_marker("own_ray") is None,
                                 item.module.__name__ not in slow))


@pytest.fixture(scope="session")
def task():
    return load_task("digits", 0)


@pytest.fixture(scope="session")
def layers(task):
    return compressible_layers(task.teacher())


@pytest.fixture(scope="session")
def profile():
    return load_profile("cpu-avx512-vnni")


def host_builtin() -> str:
    """The built-in CPU profile this machine can measure (AVX-512 VNNI or AVX2), so that
    tests of measured latency run on any x86 host the suite meets."""
    for name in ("cpu-avx512-vnni", "cpu-avx2"):
        if measurable_here(load_profile(name))[0]:
            return name
    pytest.skip("this CPU has neither AVX-512 VNNI nor AVX2: no built-in CPU profile measures here")


def host_reduce_range() -> bool:
    """Without VNNI, ONNX Runtime's U8S8 kernels saturate unless weights use 7 bits: quantize
    as this host's profile says, so int8 accuracy checks hold on any x86 host."""
    return load_profile(host_builtin()).int8.reduce_range


def fast_profile_file() -> Path:
    """The host's profile with shorter measurements, written where a user's profile would be."""
    import tempfile

    data = yaml.safe_load((PROFILES_DIR / f"{host_builtin()}.yaml").read_text())
    data["name"] = "fast-host"
    data["measure"].update(warmup_runs=3, min_runs=10, min_time_s=0.1, side_by_side_rounds=3)
    text = yaml.safe_dump(data)
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]  # checkouts with other profiles differ
    path = Path(tempfile.gettempdir()) / "search-tests" / f"fast-host-{digest}.yaml"
    path.parent.mkdir(exist_ok=True)
    if not path.exists():  # parallel test processes write the same text: whole or not at all
        write_atomic(path, lambda handle: handle.write(text.encode()))
    return path


@pytest.fixture(scope="session")
def fast_profile_path() -> Path:
    return fast_profile_file()


@pytest.fixture(scope="session")
def fast_profile(fast_profile_path):
    return load_profile(fast_profile_path)




def _warm_ray_resources() -> dict[str, float]:
    """The device resources of the profiles the suite measures on: a study on a Ray that
    lacks its profile's resource would predict instead of measure."""
    names = [fast_profile_file(), PROFILES_DIR / f"{host_builtin()}.yaml"]
    return {**{load_profile(n).resource: 1.0 for n in names}, "hw:host": 1.0}


_WARM_RAY = {"running": False}


def stop_warm_ray() -> None:
    """Shut the session's warm Ray down (never a Ray some test started itself): for a
    module fixture that starts or joins its own Ray before its tests' autouse fixtures run."""
    import ray

    if _WARM_RAY["running"]:
        ray.shutdown()
        _WARM_RAY["running"] = False


@pytest.fixture(autouse=True)
def _warm_ray(request):
    """One Ray for the in-process studies of the whole session, as a notebook user running
    several studies has: each study would otherwise start its own (seconds) with cold workers
    that import torch again. Tests marked ``own_ray`` (how the search starts or joins Ray,
    faults set in the workers' environment) run without it."""
    import ray

    if request.node.get_closest_marker("own_ray"):
        stop_warm_ray()
        yield
        return
    if not ray.is_initialized():
        import logging

        ray.init(address="local", resources=_warm_ray_resources(), include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
        _WARM_RAY["running"] = True
    yield


def warm_ray_address() -> str:
    """The address of the session's warm Ray, for a command-line study to join with
    ``--ray-address`` (seconds saved: no Ray of its own, workers that imported torch
    already) where how the driver starts Ray is not the subject. Only in tests not marked
    ``own_ray``, which the warm Ray serves."""
    import ray

    assert _WARM_RAY["running"], "the warm Ray serves tests not marked own_ray only"
    return ray.get_runtime_context().gcs_address


_PROCESS_WIDE = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS")


@pytest.fixture(autouse=True)
def _no_leaked_environment():
    """Fail a test that leaves the variables every later study reads changed (a stopped
    server's URI left in $MLFLOW_TRACKING_URI sends the next test's study to it), and put
    them back so that the tests after it are not its victims."""
    import os

    before = {name: os.environ.get(name) for name in _PROCESS_WIDE}
    yield
    after = {name: os.environ.get(name) for name in _PROCESS_WIDE}
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    changed = [f"${name}={after[name]!r}" for name in _PROCESS_WIDE if after[name] != before[name]]
    if changed:
        pytest.fail(f"the test left {', '.join(changed)} set for the tests after it")


def done_rows(rows):  # noqa: ANN001, ANN201
    """The rows of a trials.csv that a study's budget counts: COMPLETE or stopped early
    (PRUNED), refinements of front members excluded."""
    counted = rows["state"].isin(["COMPLETE", "PRUNED"])
    if "refined_from" in rows:
        counted &= rows["refined_from"].isna()
    return rows[counted]


def skip_unless_ci(reason: str) -> None:
    """Skip with ``reason``; under CI=true (.ci/run) fail instead, since there the test's
    prerequisites are installed and a skip would hide that they are not."""
    import os

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port whose runs and artifacts live under ``root``
    (a SQLite store, so they survive a restart on the same root and port).

    A new store starts from the migrated empty one the search itself uses for new stores
    (seconds of schema migrations saved), and the server runs without MLflow 3's job
    runner (eight more Python processes that import MLflow, for jobs a study never runs)."""
    import os

    from search.results._mlflow_store import seed_sqlite_store

    root.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{root / 'mlflow.db'}"
    seed_sqlite_store(store)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", store,
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "a"), text=True,
        start_new_session=True,  # its own process group: stop_mlflow_server ends its workers too
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail("mlflow server exited: " + (root / "server.log").read_text()[-2000:])
    proc.kill()
    pytest.fail("mlflow server did not start")


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """Kill a server from start_mlflow_server with its workers, as a crash would."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


QUICK_SPACE = """
name: quick
pruning:
  unstructured_sparsity: {low: 0.0, high: 0.5, step: 0.1}
  unstructured_criterion: [magnitude]
  structured_ratio: {low: 0.0, high: 0.3, step: 0.1}
  structured_importance: [magnitude]
distillation:
  epochs: {low: 0, high: 0}
quantization:
  calibration_method: [minmax]
  calibration_samples: {low: 64, high: 128}
"""  # the cheapest setting of each technique: these studies test the machinery, not them


@pytest.fixture
def quick_space(tmp_path) -> str:
    """A space with no fine-tune, for studies whose subject is not training."""
    path = tmp_path / "quick.yaml"
    path.write_text(QUICK_SPACE)
    return str(path)
