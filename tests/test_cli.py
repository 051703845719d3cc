"""The command as a user types it: bad input fails fast, with exit 2 and nothing written."""

import os
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


@pytest.mark.parametrize("flags", [["--profile", "tpu-v9"], ["--space", "nope"],
                                   ["--tracking-uri", "http://127.0.0.1:1"],
                                   ["--ray-address", "127.0.0.1:1"]])
def test_bad_input_is_refused_before_torch_ray_and_mlflow_are_imported(tmp_path, flags):
    """Such a refusal needs no model: it must not wait the seconds their import takes."""
    args = ["--profile", "host", "--budget", "3", *flags]
    code = ("import sys\nfrom search.cli import main\ncode = main(sys.argv[1:])\n"
            "heavy = sorted({'torch', 'ray', 'mlflow', 'optuna'} & set(sys.modules))\n"
            "print('imported:', ','.join(heavy))\nsys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "search: error:" in out.stderr
    assert out.stdout.strip() == "imported:"
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

    root = Path(__file__).resolve().parents[1]
    paths = sorted([*(root / "experiments").glob("*.yaml"), *(root / "examples").glob("*.yaml")])
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


@pytest.mark.parametrize("text, field, allowed", [
    ("profile: cpu-avx512-vnni\nbudget: [3\n", "line", "YAML"),  # syntax error: where
    ("profile: cpu-avx512-vnni\nbudget: 3\nsampeler: tpe\n", "sampeler", "sampler"),
    ("profile: cpu-avx512-vnni\nbudget: three\n", "budget", "valid integer"),
    ("profile: cpu-avx512-vnni\nbudget: 0\n", "budget", "greater than or equal to 1"),
    ("profile: cpu-avx512-vnni\nbudget: 3\nsampler: grid\n", "sampler", "'tpe', 'nsga2'"),
    ("profile: cpu-avx512-vnni\nbudget: 3\nparallel: -1\n", "parallel", "greater than or equal"),
    ("- profile\n- budget\n", "expected a mapping", "Settings"),
])
def test_malformed_config_file_names_file_field_and_what_is_allowed(tmp_path, text, field,
                                                                     allowed):
    config = tmp_path / "experiment.yaml"
    config.write_text(text)
    out = _run(["--config", str(config)], tmp_path)
    assert out.returncode == 2, out.stderr
    assert str(config) in out.stderr and field in out.stderr and allowed in out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment.yaml"]


def test_space_impossible_for_the_profile_fails_before_any_trial(tmp_path):
    """A space offering int8 to a profile (vpu) that runs fp16 only: exit 2, no study stored."""
    (tmp_path / "int8.yaml").write_text("name: int8-only\nquantization:\n  precisions: [int8]\n")
    out = _run(["--profile", "vpu", "--budget", "3", "--space", "int8.yaml"], tmp_path,
               timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "int8-only" in out.stderr and "vpu" in out.stderr and "allowed: fp16" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "search-runs" / "optuna.db").exists()


def test_unreachable_tracking_server_fails_fast_before_any_training(tmp_path):
    import socket
    import time

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    env = {**os.environ, "SEARCH_CACHE_DIR": str(tmp_path / "cache")}  # a teacher would be trained
    out = subprocess.run(SEARCH + ["--profile", "cpu-avx512-vnni", "--budget", "3",
                                   "--tracking-uri", f"http://u:s3cr3t@127.0.0.1:{port}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot reach the MLflow tracking server" in out.stderr
    assert f"127.0.0.1:{port}" in out.stderr and "s3cr3t" not in out.stderr + out.stdout
    assert time.monotonic() - start < 30
    assert list(tmp_path.iterdir()) == []  # no teacher trained, nothing written


def test_measuring_a_provider_missing_here_is_refused_before_any_work(tmp_path):
    """t4-gpu measures with CUDAExecutionProvider: never 'measured' on this CPU instead."""
    out = _run(["--profile", "t4-gpu", "--budget", "3", "--latency", "measure"], tmp_path)
    assert out.returncode == 2
    assert "--latency measure" in out.stderr and "CUDAExecutionProvider" in out.stderr
    assert "--latency predict" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_report_on_a_storage_with_a_password_never_prints_it(tmp_path):
    from tests.support.servers import free_port

    port = free_port()
    out = subprocess.run(SEARCH + ["report", "--study", "s", "--storage",
                                   f"postgresql://u:s3cr3t@127.0.0.1:{port}/db"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "cannot load study" in out.stderr and "u:***@127.0.0.1" in out.stderr
    assert "s3cr3t" not in out.stderr + out.stdout


def test_task_options_come_from_flags_and_config_files(tmp_path):
    from search.cli import _settings, build_parser
    from search.config import SearchConfig, load_config_file
    from search.tasks import TaskOptions

    config = tmp_path / "exp" / "c.yaml"
    config.parent.mkdir()
    config.write_text("profile: cpu-avx512-vnni\nbudget: 3\ntask: imagefolder\ndata_dir: data\n"
                      "arch: mobilenet_v2\nteacher: w/t.pt\nimage_size: 48\nteacher_epochs: 2\n")
    values = load_config_file(config)
    assert values["data_dir"] == tmp_path / "exp" / "data"  # relative to the file
    assert values["teacher"] == tmp_path / "exp" / "w" / "t.pt"
    args = build_parser().parse_args(["--config", str(config), "--arch", "resnet18",
                                      "--image-size", "32"])
    options = TaskOptions.of(SearchConfig(**_settings(args)))
    assert options.arch == "resnet18" and options.image_size == 32 and options.teacher_epochs == 2
    assert SearchConfig(profile="p", budget=1, task="my.mod:make", arch="resnet18").resolved(
        "cpu").study_name == "my.mod.make-resnet18-cpu"

    config.write_text("profile: cpu-avx512-vnni\nbudget: 3\nimage_size: 4\n")
    out = _run(["--config", str(config)], tmp_path)
    assert out.returncode == 2 and "image_size" in out.stderr


def test_experiment_files_are_valid():
    from search.config import load_config_file

    root = Path(__file__).resolve().parents[1] / "examples"
    values = load_config_file(root / "resnet18-digits.yaml")
    assert values["arch"] == "resnet18" and values["budget"] >= 30


def test_report_and_export_read_a_finished_study(tmp_path, monkeypatch, capsys, fast_profile_path,
                                                 quick_space):
    """The happy paths: `search report` prints the stored front, `search export` writes a
    front trial's ONNX model, byte for byte, and ONNX Runtime runs it."""
    import numpy as np
    import onnxruntime as ort
    import pandas as pd

    from search.cli import main
    from search.config import SearchConfig
    from search.study.run import run_search

    monkeypatch.chdir(tmp_path)
    result = run_search(SearchConfig(profile=str(fast_profile_path), budget=2,
                                     runs_root=Path("search-runs"), space=quick_space,
                                     study_name="done", latency="predict"), show_progress=False)
    front = pd.read_csv(result.output_dir / "pareto.csv")
    front = front[front["on_front"]]
    storage = f"sqlite:///{(tmp_path / 'search-runs' / 'optuna.db').resolve()}"
    capsys.readouterr()

    assert main(["report", "--study", "done", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"done: 2 completed trials, front of {len(front)}"), out

    trial = int(front["trial"].iloc[0])
    target = tmp_path / "deploy" / "model.onnx"
    assert main(["export", "--study", "done", "--trial", str(trial), "--to", str(target)]) == 0
    assert f"wrote {target} (trial {trial} of done)" in capsys.readouterr().out
    source = tmp_path / "search-runs" / "done" / "models" / f"trial-{trial}.onnx"
    assert target.read_bytes() == source.read_bytes()
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in feed.shape]
    outputs = session.run(None, {feed.name: np.zeros(shape, dtype=np.float32)})
    assert outputs[0].shape[-1] == 10  # the digits classes


def test_an_architecture_that_cannot_run_on_the_task_is_refused_before_anything_is_written(
        tmp_path):
    """MaxViT's 7x7 windows cannot partition 32 px digits: exit 2, the model, the size and
    torch's own words, and no study folder (it was a traceback from the teacher's training)."""
    out = _run(["--profile", "host", "--arch", "maxvit_t", "--budget", "3"], tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "--arch maxvit_t cannot run on 32x32 images" in out.stderr
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []
