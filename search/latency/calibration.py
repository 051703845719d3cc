"""Self-calibration of the latency model: evidence accumulates, fits are adopted only if better.

A measuring study leaves its measurements (each model's layer costs and its
measured latency) in a per-profile evidence file. Fits are made from that
evidence, never from one study alone:

- **per architecture**: the measurements of one teacher architecture (any of
  its compressed variants) refit the model for that architecture only, and
  the refit is adopted only when, under two-fold cross-validation, it
  predicts measurements it was not fitted on better than the calibration in
  use;
- **pooled**: when measurements of at least two architectures exist, one fit
  over all of them (each architecture weighing alike), adopted only when,
  leaving each architecture out in turn, it predicts the left-out one better
  than the profile's own numbers do.

A predicted study uses its architecture's fit when there is one, else the
pooled fit when adopted, else the profile's numbers, and says which. A narrow
fit on one small model (say an MLP) therefore never rewrites the predictions
for another (say a ResNet).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search._base.paths import write_atomic
from search.latency.costing import LayerCost, costing
from search.latency.fit import ARCHITECTURE_PRIOR, FIT_PRIOR, fit_calibration
from search.latency.model import Calibration, predict_ms
from search.profiles import HardwareProfile

__all__ = [
    "CalibrationChoice",
    "CalibrationStore",
    "Measurement",
    "architecture_key",
]

_COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
_MIN_SAMPLES = 5  # fewer measurements of an architecture than this fit nothing
# a refit is adopted when it lowers the held-out median error by at least this much: one
# that predicts as well (or as exactly) as the calibration in use changes nothing but churn
_GAIN = 0.005
_FIT_SAMPLES = 24  # per architecture in one fit: enough to fit a dozen factors, bounded time


@dataclass(frozen=True)
class Measurement:
    """One measured model: what it computes and how long it took."""

    architecture: str  # architecture_key of the teacher it was compressed from
    label: str  # for people: task and model class
    source: str  # "<study>/<trial>": measuring the same trial twice replaces it
    costs: tuple[LayerCost, ...]
    ms: float
    batch: int
    costing: str = "exported"  # how ``costs`` were read (costing.costing); older lines: exported


@dataclass(frozen=True)
class CalibrationChoice:
    """The calibration a predicted study uses, and why (logged with the study)."""

    calibration: Calibration
    kind: str  # "architecture", "pooled" or "profile"
    description: str
    path: Path | None = None

    @property
    def fitted_on(self) -> int:
        return self.calibration.fitted_on


def architecture_key(input_shape: Sequence[int], state: dict[str, Any]) -> str:
    """A short fingerprint of an architecture: input shape and every tensor's name and shape.

    Two tasks with the same model and input share it; compressed variants of a
    teacher are measured under their teacher's key.
    """
    parts = [repr(tuple(input_shape))]
    parts += [f"{k}:{tuple(getattr(v, 'shape', ()))}" for k, v in sorted(state.items())]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _error(cal: Calibration, data: Sequence[Measurement], profile: HardwareProfile) -> float:
    """Median absolute relative error of ``cal`` on ``data``."""
    return float(np.median([abs(predict_ms(m.costs, profile, cal) / m.ms - 1) for m in data]))


def _fit(data: Sequence[Measurement], profile: HardwareProfile,
         prior: float = FIT_PRIOR) -> Calibration:
    """Fit over ``data``, each architecture weighing alike (the many samples of one would
    otherwise decide the shared factors), on at most ``_FIT_SAMPLES`` of each, spread over
    its latencies: evidence grows with every measuring study, and a refit over 177
    measurements of 7 architectures, each kept, took 239 s at the end of a study."""
    by_arch: dict[str, list[Measurement]] = {}
    for m in data:
        by_arch.setdefault(m.architecture, []).append(m)
    chosen = {arch: _spread(ms, _FIT_SAMPLES) for arch, ms in by_arch.items()}
    most = max(len(ms) for ms in chosen.values())
    samples = [(list(m.costs), m.ms) for ms in chosen.values() for m in ms]
    weights = [most / len(ms) for ms in chosen.values() for _ in ms]
    fitted = fit_calibration(samples, profile, weights=weights, prior=prior)
    return Calibration(**{**asdict(fitted), "fitted_on": len(data)})


def _spread(data: Sequence[Measurement], most: int) -> list[Measurement]:
    """At most ``most`` of ``data``, evenly spaced in latency order (all of them if fewer)."""
    if len(data) <= most:
        return list(data)
    ordered = sorted(data, key=lambda m: m.ms)
    return [ordered[round(i * (len(ordered) - 1) / (most - 1))] for i in range(most)]


def _cross_validated_error(data: Sequence[Measurement], profile: HardwareProfile,
                           prior: float = FIT_PRIOR) -> float:
    """Two-fold error of refitting on ``data``: each half predicted by a fit on the other.

    The halves are stratified by the precisions a model runs and by latency, so
    each half holds every kind of variant the other is asked to predict.
    """
    def kind(m: Measurement) -> tuple[str, ...]:
        return tuple(sorted({c.precision for c in m.costs if c.op_type in _COMPUTE_OPS}))

    ordered = sorted(data, key=lambda m: (kind(m), m.ms))
    halves = (ordered[0::2], ordered[1::2])
    errors = []
    for train, test in (halves, halves[::-1]):
        if len(train) < 3 or not test:
            return math.inf
        fit = _fit(train, profile, prior)
        errors += [abs(predict_ms(m.costs, profile, fit) / m.ms - 1) for m in test]
    return float(np.median(errors))


def _costs_to_json(costs: Sequence[LayerCost]) -> list[dict[str, Any]]:
    return [asdict(c) for c in costs]


class CalibrationStore:
    """The evidence and the adopted fits of one profile, under ``<root>/calibration/<profile>/``.

    Writers take a file lock and replace files atomically, so two studies
    finishing at once neither tear a file nor lose each other's evidence, and
    a reader never sees half a file.
    """

    def __init__(self, root: Path, profile: HardwareProfile) -> None:
        self.profile = profile
        self.dir = root / "calibration" / profile.name
        self.evidence_path = self.dir / "evidence.jsonl"
        self.fits_path = self.dir / "fits.json"
        self.costing = costing(profile)  # evidence and fits costed otherwise are not used

    # --- reading -------------------------------------------------------------------------
    def measurements(self) -> list[Measurement]:
        """Every measurement kept for this profile and costed as it is costed now (unreadable
        lines, and lines costed another way by an earlier version, are skipped)."""
        if not self.evidence_path.is_file():
            return []
        out = []
        for line in self.evidence_path.read_text().splitlines():
            try:
                d = json.loads(line)
                costs = tuple(LayerCost(**c) for c in d.pop("costs"))
                out.append(Measurement(costs=costs, **d))
            except (ValueError, TypeError, KeyError):
                continue
        return [m for m in out if m.costing == self.costing]

    def _fits(self) -> dict[str, Any]:
        empty = {"architectures": {}, "pooled": None, "costing": self.costing}
        try:
            data = json.loads(self.fits_path.read_text())
        except (OSError, ValueError):
            return empty
        if not isinstance(data, dict) or data.get("costing", "exported") != self.costing:
            return empty  # fitted on costs read another way: refit from matching evidence
        return data

    def choose(self, architecture: str | None) -> CalibrationChoice:
        """The calibration for a predicted study of ``architecture`` (None: unknown)."""
        settings = self.profile.latency_model
        if settings is None:
            raise ValueError(f"profile {self.profile.name!r} has no latency_model")
        fits = self._fits()
        entry = fits.get("architectures", {}).get(architecture) if architecture else None
        try:
            if entry is not None:
                cal = Calibration(**entry["calibration"])
                return CalibrationChoice(
                    cal, "architecture",
                    f"fitted on {cal.fitted_on} measurements of this architecture "
                    f"({entry.get('label', architecture)})", self.fits_path)
            pooled = fits.get("pooled")
            if pooled is not None:
                cal = Calibration(**pooled["calibration"])
                labels = ", ".join(pooled.get("labels", []))
                return CalibrationChoice(
                    cal, "pooled",
                    f"pooled fit on {cal.fitted_on} measurements of {len(pooled.get('labels', []))} "
                    f"architectures ({labels}); none of this one", self.fits_path)
        except (KeyError, TypeError):
            pass  # a file of another version: fall back to the profile's numbers
        return CalibrationChoice(Calibration.of(settings), "profile",
                                 f"the profile's own numbers ({self.profile.name}.yaml)")

    # --- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, path: Path, text: str) -> None:
        write_atomic(path, lambda handle: handle.write(text.encode()))

    def add(self, new: Sequence[Measurement]) -> list[str]:
        """Keep ``new`` with the evidence, refit, adopt what predicts better; say what changed."""
        with self._locked():
            sources = {m.source for m in new}
            data = [m for m in self.measurements() if m.source not in sources] + list(new)
            lines = [json.dumps({**asdict(m), "costs": _costs_to_json(m.costs)}) for m in data]
            self._write(self.evidence_path, "\n".join(lines) + "\n")
            fits = self._fits()
            notes = [self._refit_architectures(fits, data, {m.architecture for m in new}),
                     self._refit_pooled(fits, data)]
            self._write(self.fits_path, json.dumps(fits, indent=1))
        return [n for n in notes if n]

    def _refit_architectures(self, fits: dict[str, Any], data: Sequence[Measurement],
                             changed: set[str]) -> str:
        notes = []
        for arch in sorted(changed):
            mine = [m for m in data if m.architecture == arch]
            if len(mine) < _MIN_SAMPLES:
                continue
            current = self.choose(arch)
            before = _error(current.calibration, mine, self.profile)
            after = _cross_validated_error(mine, self.profile, ARCHITECTURE_PRIOR)
            label = mine[-1].label
            if after <= before - _GAIN:
                fits.setdefault("architectures", {})[arch] = {
                    "label": label,
                    "calibration": asdict(_fit(mine, self.profile, ARCHITECTURE_PRIOR)),
                    "cross_validated_error": after, "previous_error": before,
                }
                notes.append(f"{label}: refit on {len(mine)} measurements adopted (held-out "
                             f"median error {after:.0%} against {before:.0%} for {current.kind})")
            elif math.isinf(after):  # too few of some kind of variant to hold any out
                notes.append(f"{label}: {len(mine)} measurements are too few to check a refit "
                             f"on held-out ones; {current.kind} stays in use")
            else:
                notes.append(f"{label}: refit on {len(mine)} measurements not adopted (held-out "
                             f"median error {after:.0%}, {current.kind} has {before:.0%})")
        return "; ".join(notes)

    def _refit_pooled(self, fits: dict[str, Any], data: Sequence[Measurement]) -> str:
        archs = sorted({m.architecture for m in data})
        if len(archs) < 2:
            return ""
        settings = self.profile.latency_model
        assert settings is not None  # add() is only called for profiles with a model
        default = Calibration.of(settings)
        held_out, baseline = [], []
        for arch in archs:
            rest = [m for m in data if m.architecture != arch]
            left = [m for m in data if m.architecture == arch]
            if len({m.architecture for m in rest}) < 1 or len(rest) < 3:
                return ""
            fit = _fit(rest, self.profile)
            held_out.append(_error(fit, left, self.profile))
            baseline.append(_error(default, left, self.profile))
        after, before = float(np.median(held_out)), float(np.median(baseline))
        if after <= before - _GAIN:
            labels = sorted({m.label for m in data})
            fits["pooled"] = {"labels": labels, "calibration": asdict(_fit(data, self.profile)),
                              "leave_one_architecture_out_error": after, "profile_error": before}
            return (f"pooled fit over {len(archs)} architectures adopted (leave-one-architecture-"
                    f"out median error {after:.0%} against {before:.0%} for the profile's numbers)")
        fits["pooled"] = None
        return (f"pooled fit over {len(archs)} architectures not adopted (leave-one-architecture-"
                f"out median error {after:.0%}, the profile's numbers {before:.0%})")
