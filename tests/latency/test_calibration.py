"""Self-calibration accumulates evidence and never lets one architecture's fit rewrite another's."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, resnet34

from search.latency.calibration import CalibrationStore, Measurement, architecture_key
from search.latency.predict import Calibration, costing, costs_from_torch, predict_ms
from search.profiles import load_profile

PROFILE = "cpu-avx512-vnni"


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                         nn.ReLU(), nn.Linear(width, 10))


def _variants(kind: str):
    """(architecture key, label, [costs]) for compressed-looking variants of one architecture."""
    if kind == "mlp":
        models, shape = [_mlp(w) for w in (64, 128, 256, 512)], (1, 8, 8)
    elif kind == "resnet":
        models, shape = [resnet18(num_classes=10), resnet34(num_classes=10)], (3, 32, 32)
    else:
        models = [mobilenet_v2(num_classes=10, width_mult=w) for w in (0.5, 1.0)]
        shape = (3, 32, 32)
    key = architecture_key(shape, models[-1].state_dict())
    costs = [costs_from_torch(m, shape, 1, p) for m in models for p in ("fp32", "int8")]
    return key, kind, costs


def _measured(kind: str, truth: Calibration, profile, study: str = "s") -> list[Measurement]:
    key, label, costs = _variants(kind)
    return [Measurement(key, label, f"{study}/{i}", tuple(c), predict_ms(c, profile, truth), 1,
                        costing(profile)) for i, c in enumerate(costs)]


@pytest.fixture
def profile():
    return load_profile(PROFILE)


# the narrow fit the issue saw on a small MLP: int8 at 3 % efficiency, overheads x6.4
NARROW = Calibration({"fp32": 0.3, "int8": 0.03}, op_overhead_us=5.0, session_overhead_us=20.0,
                     overhead_scale={"int8": 6.4})


def test_one_architecture_fit_leaves_other_architectures_predictions_alone(tmp_path, profile):
    store = CalibrationStore(tmp_path, profile)
    resnet_key, _, resnet_costs = _variants("resnet")
    before = [predict_ms(c, profile, store.choose(resnet_key).calibration) for c in resnet_costs]
    notes = store.add(_measured("mlp", NARROW, profile))
    assert any("adopted" in n for n in notes), notes

    choice = store.choose(resnet_key)
    assert choice.kind == "profile" and "profile" in choice.description
    after = [predict_ms(c, profile, choice.calibration) for c in resnet_costs]
    assert after == pytest.approx(before, rel=1e-12)

    # the MLP itself gets its own fit, which reproduces its measurements
    mlp = _measured("mlp", NARROW, profile)
    fitted = store.choose(mlp[0].architecture)
    assert fitted.kind == "architecture" and fitted.fitted_on == len(mlp)
    errors = [abs(predict_ms(m.costs, profile, fitted.calibration) / m.ms - 1) for m in mlp]
    assert max(errors) < 0.15, errors


def test_a_refit_that_predicts_no_better_is_not_adopted(tmp_path, profile):
    """Measurements the profile's numbers already predict exactly: a refit cannot beat it."""
    store = CalibrationStore(tmp_path, profile)
    exact = _measured("mlp", Calibration.of(profile.latency_model), profile)
    notes = store.add(exact)
    assert any("not adopted" in n for n in notes), notes
    assert store.choose(exact[0].architecture).kind == "profile"


def test_evidence_accumulates_and_resumed_trials_replace_their_own(tmp_path, profile):
    store = CalibrationStore(tmp_path, profile)
    store.add(_measured("mlp", NARROW, profile, study="a"))
    store.add(_measured("mlp", NARROW, profile, study="a"))  # the same study again: replaced
    store.add(_measured("resnet", NARROW, profile, study="b"))
    kept = store.measurements()
    assert len(kept) == 8 + 4
    assert {m.source.split("/")[0] for m in kept} == {"a", "b"}


def test_pooled_fit_serves_an_unseen_architecture_when_it_predicts_better(tmp_path, profile):
    """Two architectures measured on one (unknown to the profile) device: the pooled fit
    predicts a third, never measured, better than the profile's numbers."""
    truth = Calibration({"fp32": 0.15, "int8": 0.12}, op_overhead_us=3.0,
                        session_overhead_us=60.0, memory_efficiency={"fp32": 2.0, "int8": 2.0})
    store = CalibrationStore(tmp_path, profile)
    store.add(_measured("mlp", truth, profile, study="a"))
    notes = store.add(_measured("resnet", truth, profile, study="b"))
    assert any("pooled fit over 2 architectures adopted" in n for n in notes), notes
    unseen = _measured("mobilenet", truth, profile, study="c")
    choice = store.choose(unseen[0].architecture)
    assert choice.kind == "pooled"
    err = [abs(predict_ms(m.costs, profile, choice.calibration) / m.ms - 1) for m in unseen]
    default = Calibration.of(profile.latency_model)
    err0 = [abs(predict_ms(m.costs, profile, default) / m.ms - 1) for m in unseen]
    assert max(err) < 0.25 and sum(err) < sum(err0), (err, err0)


def _add_in_process(root: str, study: str) -> None:
    profile = load_profile(PROFILE)
    CalibrationStore(Path(root), profile).add(_measured("mlp", NARROW, profile, study=study))


def test_two_concurrent_writers_keep_both_studies_evidence(tmp_path, profile):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_in_process, args=(str(tmp_path), s)) for s in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    kept = CalibrationStore(tmp_path, profile).measurements()
    assert sorted({m.source.split("/")[0] for m in kept}) == ["x", "y"] and len(kept) == 16
    assert CalibrationStore(tmp_path, profile).choose(kept[0].architecture).kind == "architecture"


def test_evidence_and_fits_costed_another_way_are_not_used(tmp_path, profile):
    """Evidence an earlier version kept (layer costs read from the exported graph, where the
    CPU profile now reads the executed one) and the fits made from it are set aside: a
    predicted study uses the profile's numbers until measurements costed the current way
    refit them, and those replace the stale lines."""
    import json
    from dataclasses import replace

    store = CalibrationStore(tmp_path, profile)
    assert store.costing == "executed"  # a CPU-provider profile
    stale = [replace(m, costing="exported") for m in _measured("resnet", NARROW, profile, "old")]
    store.add(stale)
    assert store.measurements() == [] and store.choose("x").kind == "profile"
    fits = json.loads(store.fits_path.read_text())
    fits["costing"] = "exported"  # as an earlier version wrote it, adopted fit and all
    fits["pooled"] = {"labels": ["a", "b"], "calibration": vars(NARROW)}
    store.fits_path.write_text(json.dumps(fits))
    assert store.choose("x").kind == "profile"
    fresh = _measured("resnet", NARROW, profile, "new")
    store.add(fresh)
    assert {m.source for m in store.measurements()} == {m.source for m in fresh}
    assert json.loads(store.fits_path.read_text())["costing"] == "executed"
