"""MLflow against a real `mlflow server` on loopback: runs, children, a deployable front model."""

from __future__ import annotations

import os

import mlflow
import mlflow.onnx
import pytest
from mlflow.tracking import MlflowClient

from search.config import SearchConfig
from search.results.tracking import EXPERIMENT, _fluent_tracking_uri
from search.study.run import run_search
from search.trial.evaluate import onnx_accuracy
from tests.support.helpers import QUICK_SPACE, skip_unless_ci
from tests.support.servers import free_port, start_mlflow_server, stop_mlflow_server


@pytest.mark.parametrize("before", [None, "http://user-choice.example:5000"])
def test_logging_front_models_leaves_the_tracking_uri_of_the_process_as_it_was(
        tmp_path, monkeypatch, before):
    """MLflow's fluent API writes $MLFLOW_TRACKING_URI; left set, the next study of the same
    process (a notebook, a test session) would log into this study's store."""
    from torch import nn

    from search.results.tracking import Tracker
    from search.trial.compress import export_onnx

    if before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    model = tmp_path / "m.onnx"
    model.write_bytes(export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (4,)))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "s", tmp_path / "art")
    tracker.log_models({0: model}, (4,))
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_logged_model(client.search_logged_models(
        [tracker.experiment_id])[0].model_id).source_run_id == tracker.parent_id



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, port = None, free_port()
    try:
        proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc is not None:
            stop_mlflow_server(proc)


@pytest.fixture(scope="module")
def served(server, tmp_path_factory, fast_profile_path):
    """One study against the server, read by the tests below (none of them changes it)."""
    root = tmp_path_factory.mktemp("served")
    (root / "quick.yaml").write_text(QUICK_SPACE)  # what is logged, not what is trained
    config = SearchConfig(profile=str(fast_profile_path), budget=3, runs_root=root, refine=0,
                          tracking_uri=server, study_name="served", space=str(root / "quick.yaml"))
    return root, run_search(config, show_progress=False)


@pytest.mark.slow
def test_study_against_a_tracking_server(server, served, task):
    _, result = served
    client = MlflowClient(server)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["study_name"] == "served"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "pareto.html", "pareto.png", "summary.md", "trials.csv", "config.yaml",
            "profile.yaml"} <= artifacts
    assert parent.data.metrics["hypervolume"] > 0
    assert {"profile", "task", "space", "sampler", "budget", "seed", "storage"} <= set(
        parent.data.params)
    exp = client.get_experiment_by_name(EXPERIMENT)
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    front = [c for c in children if c.data.tags.get("on_front") == "true"]
    assert front
    for child in children:
        assert {"accuracy", "accuracy_drop", "latency_median_ms", "latency_p90_ms", "latency_cv",
                "size_mb", "macs", "sparsity"} <= set(child.data.metrics)
        assert {"on_front", "latency_source", "device", "state"} <= set(child.data.tags)
    with _fluent_tracking_uri(server):  # models:/ URIs resolve against the fluent API's server
        for child in front:
            model = mlflow.onnx.load_model(child.data.tags["model_uri"])
            accuracy = onnx_accuracy(model.SerializeToString(), task.val)
            assert accuracy == pytest.approx(child.data.metrics["accuracy"])


@pytest.mark.slow
def test_offline_plot_loads_no_remote_script(served):
    root, _ = served
    html = (root / "served" / "pareto.html").read_text()
    assert "<svg" in html and "<script src" not in html and "http" not in html.split("<body>")[1]


def _browser():
    """Headless Debian Chromium through Selenium, or skip saying what is missing."""
    import shutil

    try:
        from selenium import webdriver
    except ImportError:
        skip_unless_ci("selenium is not installed (pip install -e '.[dev]')")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        skip_unless_ci("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.mark.slow
def test_a_person_reviews_the_study_in_the_mlflow_ui(server, served, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    shots = tmp_path / "screenshots"  # kept for a person to see in pytest's basetemp
    shots.mkdir()
    try:
        _, result = served
        client = MlflowClient(server)
        exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
        parent = result.parent_run_id
        wait = WebDriverWait(browser, 90)

        browser.get(f"{server}/#/experiments/{exp}/runs")
        wait.until(lambda d: "served" in d.find_element("tag name", "body").text)
        browser.save_screenshot(str(shots / "experiment.png"))

        browser.get(f"{server}/#/experiments/{exp}/runs/{parent}/artifacts")
        wait.until(lambda d: "pareto.html" in d.find_element("tag name", "body").text)
        browser.save_screenshot(str(shots / "parent-artifacts.png"))

        browser.find_element("xpath", "//*[text()='pareto.html']").click()
        wait.until(lambda d: d.find_elements("tag name", "iframe"))
        browser.switch_to.frame(browser.find_elements("tag name", "iframe")[0])
        wait.until(lambda d: d.find_elements("css selector", "svg circle"))
        body = browser.find_element("tag name", "body").text
        assert "Pareto front" in body and "served" in body
        points = browser.find_elements("css selector", "svg circle")
        assert len(points) == len(result.trials)
        browser.switch_to.default_content()
        browser.save_screenshot(str(shots / "pareto.png"))

        children = client.search_runs(
            [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                 "tags.on_front = 'true'")
        child = children[0]
        browser.get(f"{server}/#/experiments/{exp}/runs/{child.info.run_id}")
        wait.until(lambda d: "latency_median_ms" in d.find_element("tag name", "body").text)
        text = browser.find_element("tag name", "body").text
        assert "on_front" in text and f"trial-{child.data.tags['search.trial']}" in text
        browser.save_screenshot(str(shots / "front-child.png"))
        assert all((shots / f).stat().st_size > 10_000 for f in
                   ("experiment.png", "parent-artifacts.png", "pareto.png", "front-child.png"))
    finally:
        browser.quit()
