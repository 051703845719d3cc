"""Small helpers of the tests that run studies: a quick space, the trials a budget counts,
skips that fail under CI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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


def write_space(tmp_path: Path, name: str, **sections) -> str:
    """A space file ``name`` of these sections, under ``tmp_path``: its path."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **sections}))
    return str(path)


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
