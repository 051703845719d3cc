"""Self-calibration accumulates evidence and never lets one architecture's fit rewrite another's."""

from __future__ import annotations

import multiprocessing
import os
import statistics
from pathlib import Path

import pytest
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, resnet34

from search.config import SearchConfig
from search.latency.calibration import CalibrationStore, Measurement, architecture_key
from search.latency.costing import costing
from search.latency.model import Calibration, predict_latency, predict_ms
from search.profiles import load_profile, measurable_here
from search.study.refine import _interleaved
from search.study.run import run_search
from search.trial.costs import costs_from_torch
from tests.support.plugins import PLUGIN

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
    settings = profile.latency_model
    truth = Calibration({"fp32": 0.35, "int8": 0.2}, op_overhead_us=6.0,
                        session_overhead_us=10.0, memory_efficiency={"fp32": 0.7, "int8": 0.7},
                        dram_gbps=settings.dram_gbps, cache_mb=settings.cache_mb)
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
    # from two architectures, a third's errors halved (the profile's are 41-53 % here)
    assert max(err) < 0.4 and sum(err) < 0.6 * sum(err0), (err, err0)


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
    assert store.costing.startswith("executed-v")  # a CPU-provider profile
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
    assert json.loads(store.fits_path.read_text())["costing"] == store.costing
    old = [replace(m, costing="executed") for m in _measured("resnet", NARROW, profile, "v1")]
    store.add(old)  # read by the version before shapes were probed and kernels rated
    assert {m.source for m in store.measurements()} == {m.source for m in fresh}


# a user's MLP: the README's plugin (tests/tasks/test_plugin.py) with its CNN swapped for one
_CNN = """    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))"""
_MLP = """    return nn.Sequential(nn.Flatten(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, 4))"""
assert _CNN in PLUGIN
MLP_PLUGIN = PLUGIN.replace(_CNN, _MLP).replace('"blobs"', '"mlp-blobs"')


@pytest.mark.slow
def test_a_measured_mlp_study_leaves_the_next_conv_net_study_predicted_true(
        tmp_path, monkeypatch, fast_profile_path, quick_space, task):
    """The issue's sequence, end to end: a measured study of an MLP, then a predicted study
    of the digits ResNet on the same profile; the second's predictions are checked against
    what its models measure here."""
    from tests.support.session import TEST_CACHE

    fast = load_profile(fast_profile_path)
    if not measurable_here(fast)[0]:
        pytest.skip(f"this machine cannot measure {fast.name}: {measurable_here(fast)[1]}")
    cache = tmp_path / "cache"  # evidence of this test only; the digits teacher is linked in
    cache.mkdir()
    for found in TEST_CACHE.glob("digits-*"):
        os.link(found, cache / found.name)
    monkeypatch.setenv("SEARCH_CACHE_DIR", str(cache))
    (tmp_path / "mlp_task.py").write_text(MLP_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))  # the driver's path only: it travels by value

    common = dict(profile=str(fast_profile_path), runs_root=tmp_path / "runs", refine=0,
                  space=quick_space, seed=0)
    run_search(SearchConfig(task="mlp_task:make_task", budget=6, latency="measure",
                            study_name="mlp", **common), show_progress=False)
    evidence = CalibrationStore(cache, fast).measurements()
    assert len(evidence) >= 5 and {m.label for m in evidence} == {evidence[0].label}

    second = run_search(SearchConfig(budget=4, latency="predict", study_name="resnet", **common),
                        show_progress=False)
    done = second.trials[second.trials["latency_source"] == "predicted"]
    assert len(done) >= 3 and done["reference"].any()
    models = {int(n): (second.output_dir / "models" / f"trial-{int(n)}.onnx").read_bytes()
              for n in done["trial"]}
    # the MLP's evidence (whether or not its own refit beat the profile's numbers on it; in one
    # run here a refit would have predicted the ResNet's int8 models 12x and 25x slower) did
    # not touch these: they are exactly what the profile's own numbers predict
    for n, model in models.items():
        own = predict_latency(model, fast, task.input_shape).median_ms
        assert done.set_index("trial").loc[n, "latency_ms"] == pytest.approx(own, rel=1e-9)
    # and they are true to what the models measure here, side by side: as speedups over the
    # fp32 reference (interleaved rounds of the fast profile's short runs), since a loaded
    # machine (the other test process) scales every latency.
    # The profile's own accuracy on a never-measured architecture is issue work, not this
    # test's: its numbers were off by 22-31 % on the 2-core Xeon and by 50 % on a CI machine
    # (predicted int8 2.4x fp32, measured 1.6x under the other test process's load). The bound
    # is a factor of 2 either way, which a poisoned fit (12x and 25x here) cannot meet
    measured = {n: statistics.median(v) for n, v in
                _interleaved(models, fast, task.input_shape, rounds=5).items()}
    ref = int(done.loc[done["reference"], "trial"].iloc[0])
    predicted = done.set_index("trial")["latency_ms"]
    ratios = {n: (predicted[ref] / predicted[n]) / (measured[ref] / measured[n])
              for n in models if n != ref}
    assert all(0.5 <= r <= 2.0 for r in ratios.values()), (ratios, measured)
