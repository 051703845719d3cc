"""Study-level search features: constraints, the duplicate cache, hypervolume history, samplers."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from search.config import SAMPLERS, SearchConfig
from search.results.pareto import hypervolume
from search.space.resolve import resolve_space
from search.space.schema import load_space
from search.study.run import run_search
from search.study.sampling import make_sampler, sample
from tests.support.helpers import write_space
from tests.support.profiles import host_builtin

pytestmark = pytest.mark.slow


ONE_SHOT = {  # no fine-tune: trials take a second or two
    "distillation": {"epochs": {"low": 0, "high": 0}},
    "pruning": {"drop_blocks": {"low": 0, "high": 0},
                "unstructured_criterion": ["magnitude"],
                "structured_importance": ["magnitude"]},
    "quantization": {"calibration_method": ["minmax"], "quant_mode": ["static"],
                     "calibration_samples": {"low": 64, "high": 64}},
}


def test_accuracy_constraint_keeps_infeasible_trials_off_the_front(tmp_path):
    config = SearchConfig(profile=host_builtin(), budget=6, runs_root=tmp_path, seed=3,
                          study_name="constrained", latency="predict", sampler="tpe",
                          max_accuracy_drop=0.5, space=write_space(tmp_path, "one-shot", **ONE_SHOT),
                          refine=0)
    result = run_search(config, show_progress=False)
    df = result.trials
    reference = float(df.loc[df["reference"], "accuracy"].iloc[0])
    assert (~df["feasible"]).any(), "the seed should give at least one too-lossy trial"
    front = df[df["on_front"]]
    assert len(front) and (front["accuracy"] >= reference - 0.5 - 1e-9).all()
    assert not (df["on_front"] & ~df["feasible"]).any()
    study = optuna.load_study(study_name="constrained", storage=config.resolved("x").storage)
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        drop = reference - t.values[0]
        assert t.user_attrs["constraint_values"] == pytest.approx([drop - 0.5])
        assert t.system_attrs["constraints"] == pytest.approx([drop - 0.5])  # the sampler saw it
    # hypervolume after every trial, stepped by trial number, never decreasing
    client = MlflowClient(result.tracking_uri)
    history = sorted(client.get_metric_history(result.parent_run_id, "hypervolume"),
                     key=lambda m: m.step)
    assert sorted({m.step for m in history}) == sorted(df["trial"].tolist())
    values = [m.value for m in history]
    assert values == sorted(values) and values[-1] == pytest.approx(hypervolume(df))
    assert values[-1] > 0  # some feasible trial is faster than fp32


def test_repeated_choices_are_answered_from_the_cache(tmp_path):
    fixed = {
        "distillation": {"epochs": {"low": 0, "high": 0}},
        "pruning": {"unstructured_sparsity": {"low": 0, "high": 0},
                    "structured_ratio": {"low": 0, "high": 0},
                    "drop_blocks": {"low": 0, "high": 0}},
        "quantization": {"granularity": "uniform", "precisions": ["fp32", "int8"],
                         "quant_mode": ["static"], "activation_type": ["uint8"],
                         "per_channel": [True], "activation_symmetric": [False],
                         "calibration_method": ["minmax"],
                         "calibration_samples": {"low": 64, "high": 64}},
    }
    config = SearchConfig(profile=host_builtin(), budget=5, runs_root=tmp_path, seed=0,
                          study_name="cached", latency="predict", sampler="random",
                          space=write_space(tmp_path, "two-points", **fixed))
    result = run_search(config, show_progress=False)
    df = result.trials
    assert len(df) == 5
    cached = df[df["cached_from"].notna()]
    assert len(cached) == 3  # only two distinct models exist: fp32 and int8
    for _, row in cached.iterrows():
        origin = df[df["trial"] == int(row["cached_from"])].iloc[0]
        assert row["accuracy"] == origin["accuracy"] and row["latency_ms"] == origin["latency_ms"]
        assert (result.output_dir / "models" / f"trial-{int(row['trial'])}.onnx").exists()
    client = MlflowClient(result.tracking_uri)
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert sum("cached_from" in c.data.tags for c in children) == 3
    written = pd.read_csv(result.output_dir / "trials.csv")
    assert written["cached_from"].notna().sum() == 3


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_explores_the_conditional_space(name, profile, layers):
    """Each sampler asks distinct configurations, and each asks a branch's parameters exactly
    when the branch is taken: distillation settings only with epochs > 0, the structured
    importance only with a structured ratio > 0."""
    resolved = resolve_space(load_space("default"), profile, layers)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler(name, seed=0, budget=12, constrained=True))
    asked = []
    for i in range(8):
        trial = study.ask()
        choices = sample(resolved, trial)
        params = set(trial.params)
        assert ({"lr", "alpha", "temperature"} <= params) == (choices.epochs > 0), params
        assert ({"lr", "alpha", "temperature"} & params == set()) == (choices.epochs == 0), params
        assert ("structured_importance" in params) == (choices.structured_ratio > 0), params
        asked.append(tuple(sorted(trial.params.items(), key=lambda kv: kv[0])))
        trial.set_user_attr("constraint_values", [float(i % 2) - 0.5])
        study.tell(trial, [90.0 + i % 5, 1.0 / (1 + i)])
    assert len(set(asked)) == 8  # no configuration asked twice


def test_sparse_transfer_from_a_checkpoint_given_on_the_command_line(tmp_path, task, monkeypatch,
                                                                    capsys):
    """The command's --sparse-init, run in this process on the session's Ray (test_chaos runs
    the command as a separate process)."""
    import torch

    from search.cli import main
    from search.trial.compress.sparsity import Sparsifier

    sparse = task.teacher()
    Sparsifier(sparse, sparsity=0.6).start(None, gradual=False)
    torch.save(sparse.state_dict(), tmp_path / "sparse.pt")
    torch.save(task.teacher().state_dict(), tmp_path / "dense.pt")
    space = write_space(tmp_path, "transfer", **{**ONE_SHOT, "pruning": {
        **ONE_SHOT["pruning"], "init": ["sparse"],
        "structured_ratio": {"low": 0, "high": 0}}})
    monkeypatch.chdir(tmp_path)
    base = ["--profile", "cpu-avx512-vnni", "--budget", "3", "--latency", "predict", "--space",
            space, "--refine", "0", "--quiet"]
    assert main(base + ["--sparse-init", str(tmp_path / "dense.pt")]) == 2
    assert "only 0.0% of its Conv/Linear weights are zero" in capsys.readouterr().err
    code = main(base + ["--sparse-init", str(tmp_path / "sparse.pt")])
    assert code == 0, capsys.readouterr().err[-3000:]
    trials = pd.read_csv(tmp_path / "search-runs" / "digits-cpu-avx512-vnni" / "trials.csv")
    searched = trials[trials["baseline"].isna()]  # the fp32 reference is the teacher itself
    assert len(searched) and (searched["param.init"] == "sparse").all()
    assert (searched["sparsity"] >= 0.59).all()


@pytest.mark.parametrize("name", ["nsga2", "gp"])
def test_nsga2_and_gp_drive_a_real_study(name, tmp_path, fast_profile_path, quick_space):
    """Each sampler runs a study end to end past its random start (at these budgets GP starts
    after 4 completed trials; NSGA-II's first population is 4 trials after the two
    baselines, which it does not breed from), so its model-based step runs in a real study:
    the budget met, the sampler recorded. Without early stopping: both samplers learn from
    completed trials only, so trials stopped early would keep them at their start."""
    budget = 7 if name == "nsga2" else 6
    result = run_search(SearchConfig(profile=str(fast_profile_path), budget=budget,
                                     runs_root=tmp_path,
                                     space=quick_space, study_name=name, sampler=name,
                                     latency="predict", early_stopping=False, refine=0),
                        show_progress=False)
    assert sorted(result.trials["trial"]) == list(range(budget))
    assert result.trials["on_front"].any()
    if name == "nsga2":  # the last trial was bred from the first generation
        study = result.load_study()
        assert max(t.system_attrs.get("NSGAIISampler:generation", 0) for t in study.trials) >= 1
    parent = MlflowClient(result.tracking_uri).get_run(result.parent_run_id)
    assert parent.data.params["sampler"] == name


def test_max_latency_keeps_slower_trials_off_the_front(tmp_path, fast_profile_path, quick_space,
                                                       monkeypatch, capsys):
    """The two baselines (fp32, int8) have deterministic predicted latencies: a limit between
    them (``--max-latency-ms`` on the command line) keeps the slower one off the front and
    marks it infeasible, whatever its accuracy."""
    from search.cli import main

    base = dict(profile=str(fast_profile_path), budget=2, runs_root=tmp_path, space=quick_space,
                latency="predict")
    free = run_search(SearchConfig(**base, study_name="free"), show_progress=False).trials
    fast, slow = sorted(free["latency_ms"])
    assert fast < slow
    limit = (fast + slow) / 2
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["--profile", str(fast_profile_path), "--budget", "2", "--space", quick_space,
                 "--latency", "predict", "--study-name", "capped",
                 "--max-latency-ms", repr(limit)]) == 0
    # predicted because it was asked, not because the device (this CPU) is out of reach
    assert "latency model (as asked (--latency predict))" in capsys.readouterr().err
    capped = pd.read_csv(tmp_path / "search-runs" / "capped" / "trials.csv")
    assert sorted(capped["latency_ms"]) == pytest.approx([fast, slow])
    over = capped[capped["latency_ms"] > limit]
    assert len(over) == 1 and not over["feasible"].any() and not over["on_front"].any()
    assert capped.loc[capped["latency_ms"] <= limit, "on_front"].all()
