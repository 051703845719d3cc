"""The layers import only what they need: a trial never loads the study's machinery, plain
settings never load torch, and the CLI answers --help and bad input before heavy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded_after(code: str) -> set[str]:
    probe = (f"import sys\n{code}\n"
             "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def test_the_trial_pipeline_loads_without_optuna_mlflow_or_ray():
    loaded = _loaded_after("import search.trial.pipeline, search.space.schema, search.space.resolve")
    assert "torch" in loaded  # it did load the pipeline
    assert not {"optuna", "mlflow", "ray"} & loaded


def test_settings_load_without_torch():
    loaded = _loaded_after("import search.config, search.profiles, search.space.schema, search.space.resolve")
    assert not {"torch", "optuna", "mlflow", "ray"} & loaded


@pytest.mark.parametrize("argv", [["--help"], ["--profile", "nope", "--budget", "0"]])
def test_help_and_bad_flags_answer_before_heavy_imports(argv):
    loaded = _loaded_after("from search.cli import main\n"
                           f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass")
    assert not {"torch", "mlflow", "ray"} & loaded
