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


def _stored_study(tmp_path) -> str:  # noqa: ANN001
    """A finished two-trial study in a SQLite storage, written with Optuna alone."""
    import optuna

    from search._base.attrs import TrialKey
    from search._base.paths import model_path

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="done", storage=storage,
                                directions=["maximize", "minimize"])
    for number, (accuracy, latency) in enumerate(((99.0, 1.0), (98.5, 0.3))):
        study.add_trial(optuna.trial.create_trial(
            values=[accuracy, latency],
            user_attrs={TrialKey.REFERENCE: number == 0, TrialKey.CHOICES: {}}))
        path = model_path(tmp_path / "out", number)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"onnx")
    return storage


@pytest.mark.parametrize("command", ["report", "export"])
def test_report_and_export_load_neither_ray_nor_torch(tmp_path, command):
    """Reading a stored study needs Optuna and pandas, not the machinery that ran it."""
    storage = _stored_study(tmp_path)
    argv = ["report", "--study", "done", "--storage", storage]
    if command == "export":
        argv = ["export", "--study", "done", "--storage", storage, "--trial", "1",
                "--to", str(tmp_path / "m.onnx"), "--output-dir", str(tmp_path / "out")]
    loaded = _loaded_after(f"from search.cli import main\nassert main({argv!r}) == 0")
    assert "optuna" in loaded or command == "export"
    assert not {"torch", "ray", "mlflow"} & loaded
    if command == "export":
        assert (tmp_path / "m.onnx").read_bytes() == b"onnx"
