"""Where a study's latencies come from: measured on the device or predicted, never mixed,
and the self-calibration a measuring study leaves for later predictions."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import optuna

from search._base.attrs import StudyKey
from search._base.errors import ConfigError
from search._base.paths import cache_dir, model_path
from search.config import SearchConfig
from search.latency import costing, costs_for, predict_ms
from search.latency.calibration import (
    CalibrationChoice,
    CalibrationStore,
    Measurement,
)
from search.profiles import HardwareProfile
from search.results.tracking import Tracker
from search.study.execution import device_reachable
from search.trial.compress.exact_int8 import int8_saturates_here

__all__ = ["latency_source", "self_calibrate"]

log = logging.getLogger("search")


def latency_source(cfg: SearchConfig, profile: HardwareProfile, study: optuna.Study,
                    why: str, architecture: str) -> tuple[str, CalibrationChoice | None]:
    """Measured or predicted for the whole study (never mixed), and the calibration to use."""
    reachable = device_reachable(profile)
    if cfg.latency == "measure" and not reachable:
        raise ConfigError(f"--latency measure: no node of the Ray cluster advertises "
                          f"{profile.resource!r} ({why})")
    source = "measured" if cfg.latency != "predict" and reachable else "predicted"
    previous = study.user_attrs.get(StudyKey.LATENCY_SOURCE)
    if previous and previous != source:
        raise ConfigError(
            f"study {cfg.study_name!r} has {previous} latencies; resuming it with {source} ones "
            f"would mix them. Pass --latency {'measure' if previous == 'measured' else 'predict'}"
            " or choose another --study-name"
        )
    study.set_user_attr(StudyKey.LATENCY_SOURCE, source)
    if int8_saturates_here():
        log.info("accuracy: this CPU has no VNNI, and ONNX Runtime's uint8 x int8 kernels "
                 "saturate on it; int8 models are scored through an exact twin (the same "
                 "values as uint8 x uint8), as an int8 device computes them")
    if source == "measured":
        return source, None
    if profile.latency_model is None:
        raise ConfigError(f"profile {profile.name!r} cannot be measured from this process "
                          f"({why}) and has no latency_model to predict with; add one to the "
                          "profile, or join a Ray cluster whose node advertises "
                          f"{profile.resource!r}")
    return source, CalibrationStore(cache_dir(), profile).choose(architecture)


def self_calibrate(study: optuna.Study, cfg: SearchConfig, profile: HardwareProfile,
                    tracker: Tracker, architecture: str, label: str) -> None:
    """Add this study's measurements to the profile's evidence and refit from all of it."""
    batch = profile.measure.batch_size
    samples = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        path = model_path(Path(cfg.output_dir), t.number)
        if path.exists() and t.values[1] > 0:
            samples.append(Measurement(
                architecture=architecture, label=label, source=f"{cfg.study_name}/{t.number}",
                costs=tuple(costs_for(path.read_bytes(), profile)), ms=t.values[1],
                batch=batch, costing=costing(profile)))
    if len(samples) < 5:
        return
    store = CalibrationStore(cache_dir(), profile)
    for note in store.add(samples):
        log.info("latency model for %s: %s", profile.name, note)
    cal = store.choose(architecture).calibration
    predicted = [predict_ms(m.costs, profile, cal) for m in samples]
    measured = [m.ms for m in samples]
    from scipy.stats import spearmanr

    errors = [abs(p / m - 1) for p, m in zip(predicted, measured, strict=True)]
    rho = float(spearmanr(predicted, measured).statistic)
    tracker.log_summary_metrics({"latency_model_spearman": rho,
                                 "latency_model_median_abs_error": float(np.median(errors))})
    log.info("latency model for %s on this study's %d measurements: Spearman %.2f, median "
             "error %.0f%% (evidence in %s)", profile.name, len(samples), rho,
             100 * float(np.median(errors)), store.dir)
