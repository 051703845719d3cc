"""The hardware profiles the tests run on: this host's built-in CPU profile, and a copy of it
with shorter measurements."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from search._base.paths import write_atomic
from search.profiles import PROFILES_DIR, load_profile, measurable_here

PROFILE = "cpu-avx512-vnni"  # the `profile` fixture's; predicted: its latency model, no device needed


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
