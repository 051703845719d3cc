"""Ray execution: a measurement goes to the node that advertises the profile's device."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from search._base.records import Choices, TrialRecord
from search.config import SearchConfig
from search.study.execution import Executor, device_reachable
from search.study.run import run_search
from search.trial.pipeline import compress
from tests.support.warm_ray import stop_warm_ray

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]


@pytest.fixture(scope="module")
def cluster(fast_profile):
    """A head node without the device and a worker node that has it (both on loopback)."""
    stop_warm_ray()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    device_node = c.add_node(num_cpus=1, resources={fast_profile.resource: 1})
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c, device_node
    ray.shutdown()
    c.shutdown()


def test_measurement_runs_on_the_device_node(cluster, task, layers, fast_profile):
    _, device_node = cluster
    assert device_reachable(fast_profile)
    executor = Executor(task, fast_profile, train_cpus=1, measure_cpus=1)
    record = compress(TrialRecord(0, Choices(precisions={x.name: "int8" for x in layers})),
                      task, fast_profile)
    measured = [ray.get(executor.submit_measure(record)) for _ in range(3)]
    assert {m.node for m in measured} == {device_node.node_id}
    assert all(m.latency.source == "measured" and m.error is None for m in measured)


def test_study_on_a_cluster_measures_on_the_device_node(cluster, tmp_path, fast_profile_path):
    c, _ = cluster
    config = SearchConfig(profile=str(fast_profile_path), budget=2, runs_root=tmp_path,
                          ray_address=c.address, study_name="cluster", refine=0)
    result = run_search(config, show_progress=False)
    assert set(result.trials["latency_source"]) == {"measured"}
    assert ray.is_initialized()  # a cluster we joined is left running


def test_profile_without_a_device_node_is_predicted(cluster, tmp_path):
    c, _ = cluster
    config = SearchConfig(profile="t4-gpu", budget=2, runs_root=tmp_path, ray_address=c.address,
                          study_name="cluster-t4", refine=0)
    result = run_search(config, show_progress=False)
    assert set(result.trials["latency_source"]) == {"predicted"}
