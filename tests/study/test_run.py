"""End to end: real Optuna, Ray, PyTorch, ONNX Runtime and MLflow on the digits task."""

from __future__ import annotations

import onnx
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from search._base.errors import ConfigError
from search.config import SearchConfig
from search.results.tracking import EXPERIMENT
from search.study.run import run_search
from tests.support.helpers import done_rows

pytestmark = pytest.mark.slow

REQUIRED = ["trial", "accuracy", "latency_ms", "latency_source", "speedup", "size_mb"]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, fast_profile_path):
    root = tmp_path_factory.mktemp("runs")
    # the default space: the two baselines and the first known-good seed (a fine-tune)
    config = SearchConfig(profile=str(fast_profile_path), budget=3, runs_root=root, seed=0,
                          study_name="e2e", refine=0)  # refinement adds trials past the budget
    return config, run_search(config, show_progress=False)


def _children(client: MlflowClient, parent_id: str):
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_csvs_hold_the_front_and_baselines(study_run):
    config, result = study_run
    trials = pd.read_csv(result.output_dir / "trials.csv")
    pareto = pd.read_csv(result.output_dir / "pareto.csv")
    assert set(REQUIRED) <= set(trials.columns) and set(REQUIRED) <= set(pareto.columns)
    assert len(done_rows(trials)) == 3
    assert set(trials["latency_source"].dropna()) == {"measured"}
    fp32 = pareto[pareto["reference"]]
    assert fp32["baseline"].tolist() == ["fp32"]
    assert len(fp32) == 1 and fp32["speedup"].iloc[0] == pytest.approx(1.0)
    assert int(fp32["trial"].iloc[0]) == 0
    int8 = trials[trials["baseline"] == "int8"]
    assert int8["precisions"].iloc[0] == "int8:10"
    assert int8["speedup"].iloc[0] > 0 and int8["latency_source"].iloc[0] == "measured"
    # what lets int8 run faster, checked without timing (a loaded machine makes a timed
    # ratio flaky; experiments/front_vs_int8.py measures it side by side): every conv's
    # weight is stored as int8 and dequantized in the graph ORT fuses into integer kernels
    model = onnx.load(result.output_dir / "models" / f"trial-{int(int8['trial'].iloc[0])}.onnx")
    producers = {out: n for n in model.graph.node for out in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(producers[c.input[1]].op_type == "DequantizeLinear" for c in convs)
    assert all(producers[c.input[0]].op_type == "DequantizeLinear" for c in convs)
    assert pareto["on_front"].any()
    assert (result.output_dir / "pareto.png").stat().st_size > 1000


def test_mlflow_has_parent_with_front_and_one_child_per_trial(study_run):
    config, result = study_run
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["budget"] == "3"
    assert parent.data.metrics["front_size"] >= 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "trials.csv", "pareto.png", "front_models"} <= artifacts
    children = _children(client, parent.info.run_id)
    assert len(children) == 3
    on_front = [c for c in children if c.data.tags.get("on_front") == "true"]
    assert len(on_front) == int(result.trials["on_front"].sum())
    child = on_front[0]
    assert child.data.tags["latency_source"] == "measured"
    assert "accuracy" in child.data.metrics and "latency_median_ms" in child.data.metrics
    assert any(k.startswith("precision.") for k in child.data.params)


def test_rerun_resumes_without_duplicates(tmp_path, fast_profile_path, quick_space):
    """Its own study (the shared one above must keep exactly 3 trials whatever the order); no
    fine-tune, so every trial completes (none is stopped early) and none is refined."""
    from dataclasses import replace

    config = SearchConfig(profile=str(fast_profile_path), budget=2, runs_root=tmp_path, seed=0,
                          study_name="resumed", refine=0, space=quick_space)
    first = run_search(config, show_progress=False)
    assert sorted(first.trials["trial"]) == list(range(2))
    second = run_search(replace(config, budget=5), show_progress=False)  # 5: self-calibration
    assert second.parent_run_id == first.parent_run_id
    assert sorted(second.trials["trial"]) == list(range(5))
    children = _children(MlflowClient(second.tracking_uri), second.parent_run_id)
    numbers = sorted(int(c.data.tags["search.trial"]) for c in children)
    assert numbers == list(range(5))
    study = optuna.load_study(study_name="resumed",
                              storage=f"sqlite:///{(tmp_path / 'optuna.db').resolve()}")
    assert len(study.trials) == 5
    # self-calibration: the measured study refit the profile's latency model
    parent = MlflowClient(second.tracking_uri).get_run(second.parent_run_id)
    assert parent.data.metrics["latency_model_spearman"] > 0


def test_the_command_runs_end_to_end(tmp_path, fast_profile_path, quick_space, monkeypatch,
                                     capsys):
    """The command's flags, run, refinement (one front member, one epoch: the default
    refinement's length is test_multifidelity's subject) and printed result; in this process,
    on the session's Ray (test_chaos runs it as a separate process)."""
    from search.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["--profile", str(fast_profile_path), "--budget", "3", "--space", quick_space,
                 "--refine", "1", "--refine-epochs", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "Pareto front" in out and "mlflow ui --backend-store-uri" in out
    pareto = pd.read_csv(tmp_path / "search-runs" / "digits-fast-host" / "pareto.csv")
    assert set(REQUIRED) <= set(pareto.columns)


def test_gpu_profile_is_predicted_and_labelled(tmp_path, quick_space):
    config = SearchConfig(profile="t4-gpu", budget=3, runs_root=tmp_path, study_name="t4", refine=0,
                          space=quick_space)
    result = run_search(config, show_progress=False)
    pareto = pd.read_csv(result.output_dir / "pareto.csv")
    assert set(pareto["latency_source"]) == {"predicted"}
    assert pareto["device"].str.contains("latency model").all()
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.parent_run_id).data.params["latency_source"] == "predicted"
    assert {c.data.tags["latency_source"] for c in _children(client, result.parent_run_id)} == \
        {"predicted"}
    with pytest.raises(ConfigError, match="--latency measure"):
        run_search(SearchConfig(profile="t4-gpu", budget=3, runs_root=tmp_path, study_name="t4m",
                                latency="measure"), show_progress=False)


def test_vpu_study_produces_only_fp16_layers(tmp_path, quick_space):
    config = SearchConfig(profile="vpu", budget=3, runs_root=tmp_path, study_name="vpu", refine=0,
                          space=quick_space)
    result = run_search(config, show_progress=False)
    # every layer fp16 (a trial that dropped a block has fewer layers)
    assert all(p.startswith("fp16:") and " " not in p for p in result.trials["precisions"])
    assert "fp16:10" in set(result.trials["precisions"])
    assert result.trials.loc[result.trials["reference"], "baseline"].tolist() == ["fp16"]
    from search.latency import costs_from_onnx

    for path in (result.output_dir / "models").glob("*.onnx"):
        kinds = {c.precision for c in costs_from_onnx(path.read_bytes())
                 if c.op_type in ("Conv", "Gemm")}
        assert kinds == {"fp16"}, path


def test_a_study_never_mixes_latency_sources(tmp_path, fast_profile_path):
    base = SearchConfig(profile=str(fast_profile_path), budget=2, runs_root=tmp_path,
                        study_name="mix", latency="predict", refine=0)
    run_search(base, show_progress=False)
    from dataclasses import replace

    with pytest.raises(ConfigError, match="would mix them"):
        run_search(replace(base, budget=3, latency="measure"), show_progress=False)


def test_noisy_latency_is_flagged_in_csv_mlflow_and_summary(tmp_path, fast_profile_path):
    """A max_cv no measurement can meet: every trial is measured twice and flagged."""
    import yaml

    data = yaml.safe_load(fast_profile_path.read_text())
    data["name"] = "noisy-host"
    data["resource"] = "hw:fast-host"  # the same device as the fast profile's, on the warm Ray
    data["measure"]["max_cv"] = 1e-9
    profile = tmp_path / "noisy-host.yaml"
    profile.write_text(yaml.safe_dump(data))
    result = run_search(SearchConfig(profile=str(profile), budget=2, runs_root=tmp_path,
                                     study_name="noisy", refine=0), show_progress=False)
    trials = pd.read_csv(result.output_dir / "trials.csv")
    assert trials["latency_noisy"].tolist() == [True, True]
    client = MlflowClient(result.tracking_uri)
    assert {c.data.tags["latency_noisy"] for c in _children(client, result.parent_run_id)} == \
        {"true"}
    assert "2 noisy measurement(s)" in (result.output_dir / "summary.md").read_text()


def test_resuming_with_another_task_is_refused():
    from search._base.errors import ConfigError
    from search.study.run import _check_same_task

    study = optuna.create_study(directions=["maximize", "minimize"])
    first = SearchConfig(profile="p", budget=1, task="digits", arch="resnet18",
                         study_name="s").resolved("p")
    _check_same_task(study, first)
    _check_same_task(study, first)  # the same settings resume
    other = SearchConfig(profile="p", budget=1, task="digits", arch="mobilenet_v2",
                         study_name="s").resolved("p")
    with pytest.raises(ConfigError, match="arch=resnet18.*arch=mobilenet_v2"):
        _check_same_task(study, other)


def test_journal_file_storage_runs_and_resumes(tmp_path, fast_profile_path, quick_space):
    """journal:///path (what the nightly configs use): a study, then a resume to a larger
    budget, with every trial once in the journal file."""
    from dataclasses import replace

    journal = tmp_path / "shared" / "study.journal"
    config = SearchConfig(profile=str(fast_profile_path), budget=2, runs_root=tmp_path,
                          space=quick_space, study_name="journal", latency="predict",
                          storage=f"journal:///{journal}", refine=0)
    first = run_search(config, show_progress=False)
    assert journal.stat().st_size > 0 and not (tmp_path / "optuna.db").exists()
    second = run_search(replace(config, budget=3), show_progress=False)
    assert second.parent_run_id == first.parent_run_id
    assert sorted(second.trials["trial"]) == [0, 1, 2]
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="journal",
                              storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.number for t in done) == [0, 1, 2]


def test_studies_opened_at_once_on_a_new_sqlite_file_all_open(tmp_path):
    """Six drivers' studies on one new SQLite file at the same moment: Optuna alone lets
    all but one fail creating its tables ("table studies already exists")."""
    import threading

    from search.study.storage import create_or_load_study

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    start, errors = threading.Barrier(6), []

    def open_one(i: int) -> None:
        start.wait()
        try:
            create_or_load_study(url, None, f"study-{i}")
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    names = {s.study_name for s in optuna.get_all_study_summaries(url)}
    assert names == {f"study-{i}" for i in range(6)}


def test_a_validation_split_too_small_for_the_allowed_drop_is_said(task):
    """The digits' 359 validation images: one point is 3.6 images, about two standard
    errors of a 99 % accuracy; a drop of 5 points is resolved."""
    from dataclasses import replace

    from search.study.run import _eval_set_warning

    said = _eval_set_warning(task, 1.0)
    assert said is not None and f"{len(task.val.y)} samples" in said
    assert "3.6 samples" in said and "standard errors" in said
    assert _eval_set_warning(task, 5.0) is None
    assert _eval_set_warning(replace(task, metric=lambda out, y: 0.0), 1.0) is None
