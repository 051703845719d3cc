"""The test hook of search/_base/faults.py itself: what the fault, chaos and driver tests rely on."""

from __future__ import annotations

import threading
import time

import pytest

from search._base import faults as _faults


def test_a_spec_sent_with_the_task_beats_the_workers_environment(monkeypatch):
    monkeypatch.setenv(_faults.ENV, "prune@*")
    with pytest.raises(_faults.InjectedFault):
        _faults.inject("prune", 0)
    with _faults.carried(""):  # the driver had none: a stale worker environment is ignored
        _faults.inject("prune", 0)
    with _faults.carried("export@3"):
        _faults.inject("prune", 3)
        _faults.inject("export", 2)
        with pytest.raises(_faults.InjectedFault, match="export@3"):
            _faults.inject("export", 3)
    with _faults.carried(None), pytest.raises(_faults.InjectedFault):  # None: environment
        _faults.inject("prune", 0)


def test_a_gate_holds_the_stage_while_its_file_exists(tmp_path):
    gate = tmp_path / "gate"
    gate.touch()
    threading.Timer(0.5, gate.unlink).start()
    start = time.monotonic()
    with _faults.carried(f"measure@*?{gate}"):
        _faults.inject("prune", 1)  # another stage passes at once
        assert time.monotonic() - start < 0.4
        _faults.inject("measure", 1)
    assert time.monotonic() - start >= 0.5 and not gate.exists()
    with _faults.carried(f"measure@*+0.2?{gate}"):  # a delay, then the (open) gate
        before = time.monotonic()
        _faults.inject("measure", 4)
        assert time.monotonic() - before >= 0.2
