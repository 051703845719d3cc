"""The ask / screen / tell loop: trials in flight together on one node."""

from __future__ import annotations

import optuna
import pytest

from search.config import SearchConfig
from search.study import run_search

pytestmark = pytest.mark.slow


def test_parallel_two_on_one_node_runs_trials_together(tmp_path, fast_profile_path, quick_space):
    """--parallel 2 on a private one-node Ray: two trials are RUNNING at once (their
    start..complete intervals overlap), and the budget is met with no trial doubled."""
    result = run_search(SearchConfig(profile=str(fast_profile_path), budget=3, runs_root=tmp_path,
                                     space=quick_space, study_name="two", latency="predict",
                                     parallel=2), show_progress=False)
    assert sorted(result.trials["trial"]) == [0, 1, 2]
    study = optuna.load_study(study_name="two",
                              storage=f"sqlite:///{(tmp_path / 'optuna.db').resolve()}")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 3 == len(study.trials)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in done)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)), \
        spans
