"""The ecosystem's conventions: its environment variables, `--help`, `--version`, `-v`.

Precedence is flag > config file > environment variable > built-in default. The
end-to-end cases use settings that fail fast (an address nobody listens on), so the
error message shows which value won without any training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from search.config import DEFAULT_EXPERIMENT, SearchConfig
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS")


def _search(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=180, env={**clean, "PYTHONPATH": str(ROOT), **env})


@pytest.fixture
def no_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_environment_fills_what_is_unset(no_env):
    assert SearchConfig(profile="p", budget=1).resolved("p").experiment_name == DEFAULT_EXPERIMENT
    bare = SearchConfig(profile="p", budget=1).resolved("p")
    assert bare.tracking_uri is None and bare.ray_address is None
    no_env.setenv("MLFLOW_TRACKING_URI", "http://u:pw@mlflow.example:5000")
    no_env.setenv("MLFLOW_EXPERIMENT_NAME", "team-exp")
    no_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    cfg = SearchConfig(profile="p", budget=1).resolved("p")
    assert (cfg.tracking_uri, cfg.experiment_name, cfg.ray_address) == (
        "http://u:pw@mlflow.example:5000", "team-exp", "10.0.0.1:6379")
    given = SearchConfig(profile="p", budget=1, tracking_uri="sqlite:///x.db", experiment_name="mine",
                         ray_address="auto").resolved("p")
    assert (given.tracking_uri, given.experiment_name, given.ray_address) == (
        "sqlite:///x.db", "mine", "auto")


def test_empty_environment_values_are_ignored(no_env):
    for var in ENV_VARS:
        no_env.setenv(var, " ")
    cfg = SearchConfig(profile="p", budget=1).resolved("p")
    assert (cfg.tracking_uri, cfg.experiment_name, cfg.ray_address) == (None, DEFAULT_EXPERIMENT, None)


def test_flag_beats_config_file_beats_environment(no_env, tmp_path):
    from search.cli import _settings, build_parser

    no_env.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    no_env.setenv("MLFLOW_TRACKING_URI", "http://env.example:5000")
    no_env.setenv("RAY_ADDRESS", "env.example:6379")
    config = tmp_path / "c.yaml"
    config.write_text("profile: p\nbudget: 2\nexperiment_name: from-file\n"
                      "tracking_uri: http://file.example:5000\n")

    def resolved(*flags: str) -> SearchConfig:
        args = build_parser().parse_args(["--config", str(config), *flags])
        return SearchConfig(**_settings(args)).resolved("p")

    cfg = resolved()
    assert (cfg.experiment_name, cfg.tracking_uri, cfg.ray_address) == (
        "from-file", "http://file.example:5000", "env.example:6379")
    cfg = resolved("--experiment-name", "from-flag", "--tracking-uri", "http://flag.example:1",
                   "--ray-address", "auto")
    assert (cfg.experiment_name, cfg.tracking_uri, cfg.ray_address) == (
        "from-flag", "http://flag.example:1", "auto")


def test_ray_address_from_the_environment_is_joined_and_a_flag_beats_it(tmp_path):
    env_port, flag_port = free_port(), free_port()
    out = _search(["--profile", "cpu-avx512-vnni", "--budget", "2"], tmp_path,
                  RAY_ADDRESS=f"127.0.0.1:{env_port}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot reach the Ray cluster at '127.0.0.1:{env_port}'" in out.stderr
    assert "$RAY_ADDRESS" in out.stderr  # said where the address came from
    out = _search(["--profile", "cpu-avx512-vnni", "--budget", "2", "--ray-address",
                   f"127.0.0.1:{flag_port}"], tmp_path, RAY_ADDRESS=f"127.0.0.1:{env_port}")
    assert out.returncode == 2 and f"127.0.0.1:{flag_port}'" in out.stderr
    assert str(env_port) not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_tracking_uri_from_the_environment_is_used_and_a_flag_beats_it(tmp_path):
    env_port, flag_port = free_port(), free_port()
    out = _search(["--profile", "cpu-avx512-vnni", "--budget", "2"], tmp_path,
                  MLFLOW_TRACKING_URI=f"http://alice:pw9@127.0.0.1:{env_port}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot reach the MLflow tracking server at http://alice:***@127.0.0.1:{env_port}" \
        in out.stderr
    assert "pw9" not in out.stderr
    out = _search(["--profile", "cpu-avx512-vnni", "--budget", "2", "--tracking-uri",
                   f"http://127.0.0.1:{flag_port}"], tmp_path,
                  MLFLOW_TRACKING_URI=f"http://127.0.0.1:{env_port}")
    assert out.returncode == 2 and f"127.0.0.1:{flag_port}" in out.stderr
    assert str(env_port) not in out.stderr


def test_help_lists_every_subcommand_and_the_environment(tmp_path):
    out = _search(["--help"], tmp_path)
    assert out.returncode == 0
    for word in ("profiles", "report", "export", "--experiment-name", "--version", "--verbose",
                 *ENV_VARS):
        assert word in out.stdout, word
    out = _search(["report", "--help"], tmp_path)
    assert out.returncode == 0 and "--study" in out.stdout


def test_version_is_the_package_version(tmp_path):
    out = _search(["--version"], tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"search {version('hw-compression-search')}"


def test_verbose_shows_debug_messages(tmp_path):
    port = free_port()
    args = ["--profile", "cpu-avx512-vnni", "--budget", "2", "--ray-address", f"127.0.0.1:{port}"]
    quiet = _search(args, tmp_path)
    loud = _search(["-v", *args], tmp_path)
    assert quiet.returncode == loud.returncode == 2
    assert "DEBUG" not in quiet.stderr
    assert "search DEBUG: settings" in loud.stderr and "budget=2" in loud.stderr


def test_plain_study_form_and_unknown_subcommands(tmp_path):
    out = _search(["--budget", "2"], tmp_path)  # no subcommand: the study's flags
    assert out.returncode == 2 and "--profile" in out.stderr
    out = _search(["profiless"], tmp_path)
    assert out.returncode == 2 and "invalid choice: 'profiless'" in out.stderr
