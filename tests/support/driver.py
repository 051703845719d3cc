"""The driver run in this process: in-memory Optuna, stages run in-process, latency
predicted (no Ray, no subprocess, no device)."""

from __future__ import annotations

import optuna

from search._base.attrs import TrialKey
from search.config import SearchConfig
from search.latency import Calibration
from search.profiles import load_profile
from search.space.resolve import resolve_space
from search.space.schema import SearchSpace
from search.space.starts import baselines
from search.study.driver import Driver
from search.study.execution import LocalExecutor
from search.trial.pipeline import model_facts, student_layers
from tests.support.profiles import PROFILE


def search_space(**sections) -> SearchSpace:
    return SearchSpace.model_validate({"name": "test", **sections})


ONE_SHOT_TWO_MODELS = search_space(
    pruning={"structured_ratio": {"low": 0, "high": 0}, "drop_blocks": {"low": 0, "high": 0}},
    distillation={"epochs": {"low": 0, "high": 0}},
    quantization={"granularity": "uniform", "precisions": ["fp32", "int8"],
                  "per_channel": [True], "activation_symmetric": [False],
                  "calibration_method": ["minmax"], "calibration_samples": {"low": 64, "high": 64}},
)


def run_driver(task, tmp_path, space, budget, study=None, **settings):  # noqa: ANN001, ANN201
    """Run a study of ``budget`` trials of ``space`` on ``task`` (a new one, its baselines
    enqueued, unless ``study`` is given): the study, and the trial numbers the callbacks saw."""
    profile = load_profile(PROFILE)
    resolved = resolve_space(space, profile, student_layers(task), model_facts(task))
    if study is None:
        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=optuna.samplers.RandomSampler(seed=0))
        for i, (label, params) in enumerate(baselines(resolved)):
            study.enqueue_trial(params, user_attrs={TrialKey.BASELINE: label,
                                                    TrialKey.REFERENCE: i == 0})
    executor = LocalExecutor(task, profile, calibration=Calibration.of(profile.latency_model))
    seen = []
    config = SearchConfig(profile=PROFILE, budget=budget, output_dir=tmp_path, study_name="t",
                          **settings)
    driver = Driver(config, study, resolved, executor, show_progress=False,
                    callbacks=[lambda s, t: seen.append(t.number)])
    driver.run()
    return study, seen
