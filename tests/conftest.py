"""Fixtures and pytest hooks only: the real digits task (teacher trained once, cached),
profiles, the session's warm Ray. What tests share besides fixtures is in ``tests/support/``."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads OpenMP (read once, at load): idle OpenMP threads sleep instead of
# spinning. The two test processes, their Ray workers and the drivers they start share two
# cores, where spinning threads burn the time others wait for: two copies of the refinement
# test started together were both done in 105 s and 107 s (two rounds) with the default, in
# 63 s and 59 s with PASSIVE (rounds alternated, this 2-core VM). Every process the suite
# starts inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

import tests.support.session  # noqa: E402, F401 - the suite's own cache, before any test
from search.profiles import load_profile  # noqa: E402
from search.tasks import load_task  # noqa: E402
from search.trial.compress import compressible_layers  # noqa: E402
from tests.support.helpers import QUICK_SPACE  # noqa: E402
from tests.support.profiles import PROFILE, fast_profile_file  # noqa: E402
from tests.support.warm_ray import WARM_RAY, stop_warm_ray, warm_ray_resources  # noqa: E402


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
    return load_profile(PROFILE)


@pytest.fixture(scope="session")
def fast_profile_path() -> Path:
    return fast_profile_file()


@pytest.fixture(scope="session")
def fast_profile(fast_profile_path):
    return load_profile(fast_profile_path)


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

        ray.init(address="local", resources=warm_ray_resources(), include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
        WARM_RAY["running"] = True
    yield


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


@pytest.fixture
def quick_space(tmp_path) -> str:
    """A space with no fine-tune, for studies whose subject is not training."""
    path = tmp_path / "quick.yaml"
    path.write_text(QUICK_SPACE)
    return str(path)
