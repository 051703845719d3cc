"""The README's "From Python" example runs as printed (budget 2, predicted latency on t4-gpu).

It runs in an empty namespace (builtins only) in an empty directory, so the block must be
complete (imports included), in this process on the session's warm Ray, as a notebook's
second study would; the study it leaves is then opened the way Optuna's own tools
(optuna-dashboard, ``optuna.load_study``) open it, objective names and constraints intact.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def _example() -> str:
    """The first ```python block after the "From Python" heading."""
    section = (ROOT / "README.md").read_text().split("\n## From Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_from_python_example_runs(tmp_path, monkeypatch, capfd):
    code = _example()
    quick = code.replace("budget=20,", 'budget=2, latency="predict",')
    assert quick != code, "the example's SearchConfig(... budget=20, ...) changed: update this test"
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # a user's own would steer the example
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "readme-example")
    capfd.readouterr()
    exec(compile(quick, "README.md", "exec"), {"__name__": "__main__"})  # noqa: S102
    out = capfd.readouterr()
    assert "declares execution providers" not in out.err  # MLflow's per-model warning
    assert "['accuracy', 'latency_ms']" in out.out and "sqlite:///" in out.out
    assert (tmp_path / "front.png").stat().st_size > 1000

    study = optuna.load_study(study_name="notebook",
                              storage=f"sqlite:///{tmp_path / 'search-runs' / 'optuna.db'}")
    assert study.metric_names == ["accuracy", "latency_ms"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 2 and all(len(t.system_attrs["constraints"]) >= 1 for t in done)
    assert {t.user_attrs.get("latency_source") for t in done} <= {"predicted", None}

    client = MlflowClient(f"sqlite:///{tmp_path / 'search-runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("readme-example")  # from $MLFLOW_EXPERIMENT_NAME
    assert experiment is not None and client.get_experiment_by_name("compression-search") is None
    assert len(client.search_runs([experiment.experiment_id])) == 3  # the study and its 2 trials
