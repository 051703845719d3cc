"""The session's warm Ray (started by the autouse ``_warm_ray`` fixture of
``tests/conftest.py``), and what tests that need their own Ray do with it."""

from __future__ import annotations

from search.profiles import PROFILES_DIR, load_profile
from tests.support.profiles import fast_profile_file, host_builtin

WARM_RAY = {"running": False}


def warm_ray_resources() -> dict[str, float]:
    """The device resources of the profiles the suite measures on: a study on a Ray that
    lacks its profile's resource would predict instead of measure."""
    names = [fast_profile_file(), PROFILES_DIR / f"{host_builtin()}.yaml"]
    return {**{load_profile(n).resource: 1.0 for n in names}, "hw:host": 1.0}


def stop_warm_ray() -> None:
    """Shut the session's warm Ray down (never a Ray some test started itself): for a
    module fixture that starts or joins its own Ray before its tests' autouse fixtures run."""
    import ray

    if WARM_RAY["running"]:
        ray.shutdown()
        WARM_RAY["running"] = False


def warm_ray_address() -> str:
    """The address of the session's warm Ray, for a command-line study to join with
    ``--ray-address`` (seconds saved: no Ray of its own, workers that imported torch
    already) where how the driver starts Ray is not the subject. Only in tests not marked
    ``own_ray``, which the warm Ray serves."""
    import ray

    assert WARM_RAY["running"], "the warm Ray serves tests not marked own_ray only"
    return ray.get_runtime_context().gcs_address
