"""The command as a user types it: bad input fails fast, with exit 2 and nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

SEARCH = [sys.executable, "-m", "search.cli"]


def _run(args, cwd: Path, timeout=120):
    return subprocess.run(SEARCH + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_unknown_profile_lists_known_profiles_and_writes_nothing(tmp_path):
    out = _run(["--profile", "tpu-v9", "--budget", "3"], tmp_path)
    assert out.returncode == 2
    assert "tpu-v9" in out.stderr and "cpu-avx512-vnni" in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("budget", ["0", "-4", "2.5", "many"])
def test_bad_budget_is_rejected(tmp_path, budget):
    out = _run(["--profile", "cpu-avx512-vnni", "--budget", budget], tmp_path)
    assert out.returncode == 2
    assert "--budget" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_dir_fails_before_any_trial(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = _run(["--profile", "cpu-avx512-vnni", "--budget", "3", "--output-dir",
                str(blocker / "runs")], tmp_path)
    assert out.returncode == 2
    assert "output directory" in out.stderr and "cannot be written" in out.stderr
    assert not (tmp_path / "search-runs" / "optuna.db").exists()


def test_unknown_space_lists_known_spaces(tmp_path):
    out = _run(["--profile", "cpu-avx512-vnni", "--budget", "3", "--space", "nope"], tmp_path)
    assert out.returncode == 2 and "default" in out.stderr


def test_unreachable_ray_address_fails_fast_and_writes_nothing(tmp_path):
    import socket
    import time

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    out = _run(["--profile", "cpu-avx512-vnni", "--budget", "3", "--ray-address",
                f"127.0.0.1:{port}"], tmp_path)
    assert out.returncode == 2
    assert "cannot reach the Ray cluster" in out.stderr
    assert time.monotonic() - start < 30  # includes interpreter start and imports
    assert list(tmp_path.iterdir()) == []


def test_config_file_flags_win_and_unknown_keys_fail(tmp_path):
    from search.cli import _settings, build_parser

    config = tmp_path / "c.yaml"
    config.write_text("profile: cpu-avx512-vnni\nbudget: 50\nseed: 3\n")
    args = build_parser().parse_args(["--config", str(config), "--budget", "2"])
    values = _settings(args)
    assert values["budget"] == 2 and values["seed"] == 3 and values["profile"] == "cpu-avx512-vnni"

    config.write_text("profile: cpu-avx512-vnni\nbudgett: 50\n")
    out = _run(["--config", str(config)], tmp_path)
    assert out.returncode == 2
    assert "budgett" in out.stderr and "budget" in out.stderr


def test_missing_profile_or_budget_is_a_usage_error(tmp_path):
    out = _run(["--budget", "3"], tmp_path)
    assert out.returncode == 2 and "--profile" in out.stderr


def test_experiment_configs_are_valid():
    from search.config import load_config_file
    from search.profiles import load_profile

    paths = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))
    assert paths
    for path in paths:
        values = load_config_file(path)
        load_profile(values["profile"])


def test_profiles_command_lists_every_profile(tmp_path):
    out = subprocess.run(SEARCH + ["profiles"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in ("cpu-avx512-vnni", "t4-gpu", "vpu", "gna", "host"):
        assert name in out.stdout
    assert "measured here" in out.stdout and "predicted" in out.stdout
    assert "removed" in out.stdout  # legacy devices say so


def test_task_options_come_from_flags_and_config_files(tmp_path):
    from search.cli import _settings, build_parser
    from search.config import SearchConfig, load_config_file

    config = tmp_path / "exp" / "c.yaml"
    config.parent.mkdir()
    config.write_text("profile: cpu-avx512-vnni\nbudget: 3\ntask: imagefolder\ndata_dir: data\n"
                      "arch: mobilenet_v2\nteacher: w/t.pt\nimage_size: 48\nteacher_epochs: 2\n")
    values = load_config_file(config)
    assert values["data_dir"] == tmp_path / "exp" / "data"  # relative to the file
    assert values["teacher"] == tmp_path / "exp" / "w" / "t.pt"
    args = build_parser().parse_args(["--config", str(config), "--arch", "resnet18",
                                      "--image-size", "32"])
    options = SearchConfig(**_settings(args)).task_options()
    assert options.arch == "resnet18" and options.image_size == 32 and options.teacher_epochs == 2
    assert SearchConfig(profile="p", budget=1, task="my.mod:make", arch="resnet18").resolved(
        "cpu").study_name == "my.mod.make-resnet18-cpu"

    config.write_text("profile: cpu-avx512-vnni\nbudget: 3\nimage_size: 4\n")
    out = _run(["--config", str(config)], tmp_path)
    assert out.returncode == 2 and "image_size" in out.stderr


def test_experiment_files_are_valid():
    from search.config import load_config_file

    root = Path(__file__).resolve().parents[1] / "experiments"
    values = load_config_file(root / "resnet18-digits.yaml")
    assert values["arch"] == "resnet18" and values["budget"] >= 30
