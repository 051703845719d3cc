"""Latency first, stop what cannot reach the front, refine the front: on the real digits task."""

from __future__ import annotations

from dataclasses import replace

import optuna
import pandas as pd
import pytest

from search._base.records import Choices, TrialRecord
from search.config import SearchConfig
from search.study.run import run_search
from search.trial.pipeline import finetune, student_layers
from tests.support.helpers import write_space

pytestmark = pytest.mark.slow


def test_a_fine_tune_that_falls_behind_stops_after_an_epoch(task, fast_profile):
    plan = {layer.name: "fp32" for layer in student_layers(task)}
    choices = Choices(structured_ratio=0.5, epochs=2, lr=3e-3, precisions=plan)
    record = TrialRecord(0, choices, seed=1, needed_accuracy=1000.0)  # out of any reach
    out = finetune(record, task, fast_profile)
    assert out.stopped and "after epoch 1 of 2" in out.stopped, out.stopped
    assert len(out.epoch_accuracy) == 1 and out.onnx_model is None
    # the same fine-tune with a reachable bar runs to the end and is scored (checked after
    # each epoch but the last, which the final score covers)
    done = finetune(TrialRecord(0, choices, seed=1, needed_accuracy=50.0), task, fast_profile)
    assert done.stopped is None and len(done.epoch_accuracy) == 1
    assert done.onnx_model is not None and done.accuracy > 50


# Every sampled trial has the reference's structure and precision and a fine-tune: at the
# reference's latency nothing can beat the reference, so each is stopped before training.
HOPELESS = {
    "pruning": {"structured_ratio": {"low": 0.0, "high": 0.0},
                "drop_blocks": {"low": 0, "high": 0}},
    "distillation": {"epochs": {"low": 2, "high": 2}},
    "quantization": {"precisions": ["fp32"]},
}


def test_trials_that_cannot_reach_the_front_are_pruned_before_fine_tuning_and_resume(tmp_path):
    config = SearchConfig(profile="cpu-avx512-vnni", budget=3, runs_root=tmp_path, seed=0,
                          study_name="hopeless", latency="predict", refine=0,
                          space=write_space(tmp_path, "hopeless", **HOPELESS))
    result = run_search(config, show_progress=False)
    study = optuna.load_study(study_name="hopeless", storage=config.resolved("x").storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "PRUNED"], states
    for t in study.trials[1:]:
        assert "cannot reach the front" in t.user_attrs["pruned_reason"]
        assert "train" not in t.user_attrs["timings"]  # stopped before any fine-tuning
        assert t.user_attrs["choices"]["epochs"] == 2
    rows = pd.read_csv(result.output_dir / "trials.csv")
    pruned = rows[rows["state"] == "PRUNED"]
    assert len(pruned) == 2 and pruned["pruned_reason"].str.contains("cannot reach").all()
    assert (pruned["param.epochs"] == 2).all() and pruned["latency_ms"].notna().all()

    resumed = run_search(replace(config, budget=4), show_progress=False)
    study = optuna.load_study(study_name="hopeless", storage=config.resolved("x").storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]  # nothing repeated
    assert [t.state.name for t in study.trials[:3]] == states  # pruned trials kept
    assert len(resumed.trials) == 1  # the one COMPLETE trial: the reference


ONE_EPOCH = {
    "pruning": {"structured_ratio": {"low": 0.5, "high": 0.5},
                "structured_importance": ["magnitude"],
                "drop_blocks": {"low": 0, "high": 0}},
    "distillation": {"epochs": {"low": 1, "high": 1}, "distill_loss": ["response"]},
    "quantization": {"precisions": ["fp32"]},
}


def test_refinement_never_lowers_a_front_member_and_is_not_repeated(tmp_path):
    config = SearchConfig(profile="cpu-avx512-vnni", budget=3, runs_root=tmp_path, seed=0,
                          study_name="refined", latency="predict", refine=1, refine_epochs=2,
                          space=write_space(tmp_path, "one-epoch", **ONE_EPOCH))
    result = run_search(config, show_progress=False)
    study = optuna.load_study(study_name="refined", storage=config.resolved("x").storage)
    refined = study.user_attrs.get("refined", {})
    assert refined, "a pruned, one-epoch front member should have been refined"
    # what each refinement cost, adopted or not, so a benchmark can charge it to its trial
    assert set(study.user_attrs["refine_seconds"]) == set(refined)
    assert all(seconds > 0 for seconds in study.user_attrs["refine_seconds"].values())
    by_number = {t.number: t for t in study.trials}
    for source, accuracy in refined.items():
        before = by_number[int(source)].values[0]
        added = [t for t in study.trials if t.user_attrs.get("refined_from") == int(source)]
        if accuracy > before:  # adopted as its own trial, with the source's latency
            (new,) = added
            assert new.values[0] == pytest.approx(accuracy) and new.values[0] > before
            assert new.values[1] == by_number[int(source)].values[1]
            assert new.user_attrs["choices"]["epochs"] == 2
            assert (result.output_dir / "models" / f"trial-{new.number}.onnx").exists()
        else:
            assert not added
    df = result.trials
    assert df.loc[df["trial"] == 0, "accuracy"].iloc[0] == by_number[0].values[0]
    # the budget counts screened configurations only; a rerun refines nothing again
    again = run_search(config, show_progress=False)
    study = optuna.load_study(study_name="refined", storage=config.resolved("x").storage)
    assert study.user_attrs["refined"] == refined
    assert len(again.trials) == len(df)
