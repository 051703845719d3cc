"""A process that started Ray itself (a notebook's ``ray.init()``) without the device resource.

The search runs on that Ray, so no trial can be measured there: ``latency="measure"``
refuses, ``auto`` predicts and says so with a WARNING that names the fix, and a profile
with nothing to predict with is refused; never an assert.
"""

from __future__ import annotations

import logging

import pytest
import ray
import yaml

from search._base.errors import ConfigError
from search.config import SearchConfig
from search.profiles import PROFILES_DIR
from search.study.run import run_search
from tests.support.helpers import QUICK_SPACE
from tests.support.warm_ray import stop_warm_ray

pytestmark = pytest.mark.own_ray

SPACE = QUICK_SPACE


@pytest.fixture(scope="module")
def notebook_ray():
    """Ray as a user starts it: this process, no ``hw:`` resource (a new local instance)."""
    stop_warm_ray()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def warnings_of_search(caplog):
    """Records of the "search" logger, even where a CLI test stopped it propagating."""
    logger = logging.getLogger("search")
    attach = not logger.propagate  # else the root logger's capture sees the records already
    if attach:
        logger.addHandler(caplog.handler)
    yield caplog
    if attach:
        logger.removeHandler(caplog.handler)


def _config(tmp_path, **kw) -> SearchConfig:
    (tmp_path / "quick.yaml").write_text(SPACE)
    return SearchConfig(budget=2, runs_root=tmp_path, space=str(tmp_path / "quick.yaml"),
                        study_name="joined", **kw)


def test_measure_is_refused_with_the_fix(notebook_ray, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_search(_config(tmp_path, profile="host", latency="measure"), show_progress=False)
    message = str(err.value)
    assert "--latency measure: no node of this process's Ray" in message
    assert "'hw:host'" in message and "ray.shutdown()" in message
    assert ray.is_initialized()  # the user's Ray is left alone


def test_a_profile_with_nothing_to_predict_with_is_refused(notebook_ray, tmp_path):
    data = yaml.safe_load((PROFILES_DIR / "cpu-avx2.yaml").read_text())
    data.pop("latency_model")
    data["name"] = "no-model"
    path = tmp_path / "no-model.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="no latency_model"):
        run_search(_config(tmp_path, profile=str(path)), show_progress=False)


def test_auto_predicts_and_warns_why(notebook_ray, tmp_path, warnings_of_search):
    result = run_search(_config(tmp_path, profile="host"), show_progress=False)
    assert set(result.trials["latency_source"]) == {"predicted"}
    warned = [r.getMessage() for r in warnings_of_search.records if r.levelno == logging.WARNING]
    said = [m for m in warned if "will be predicted" in m]
    assert len(said) == 1, warned
    assert "'hw:host'" in said[0] and "ray.shutdown()" in said[0] and "--latency predict" in said[0]
    assert ray.is_initialized()
