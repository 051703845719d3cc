"""Settings: one set of rules, whether they come from flags, a config file or the library."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from search._base.errors import ConfigError
from search.cli import _NOT_SETTINGS, build_parser
from search.config import SearchConfig, Settings, default_study_name, load_config_file, settings_fields

BAD = [  # setting, a value its rule refuses, words of the error
    ("budget", 0, "greater than or equal to 1"),
    ("budget", True, "valid integer"),
    ("seed", -1, "greater than or equal to 0"),
    ("sampler", "grid", "'tpe', 'nsga2', 'gp' or 'random'"),
    ("parallel", 0, "greater than or equal to 1"),
    ("latency", "guess", "'auto', 'measure' or 'predict'"),
    ("max_accuracy_drop", -0.5, "greater than or equal to 0"),
    ("max_latency_ms", 0.0, "greater than 0"),
    ("grace_period_s", -5.0, "greater than or equal to 0"),
    ("image_size", 4, "greater than or equal to 8"),
    ("teacher_epochs", 0, "greater than or equal to 1"),
    ("refine", -1, "greater than or equal to 0"),
    ("refine_epochs", 0, "greater than or equal to 1"),
    ("refine_timeout_s", -1.0, "greater than or equal to 0"),
    ("batch_size", 5000, "less than or equal to 4096"),
    ("max_failures", 0, "greater than or equal to 1"),
    ("study_name", "a/b", "letters, digits"),
    ("experiment_name", "  ", "must not be empty"),
]


@pytest.mark.parametrize("name, value, words", BAD)
def test_each_rule_refuses_alike_from_the_library_and_from_a_config_file(tmp_path, name, value,
                                                                         words):
    with pytest.raises(ConfigError, match=r"invalid setting .*") as err:
        SearchConfig(**{"profile": "host", "budget": 3, name: value}).validate()
    assert name in str(err.value) and words in str(err.value)
    config = tmp_path / "c.yaml"
    config.write_text(f"{name}: {value!r}\n".replace("True", "true"))
    with pytest.raises(ConfigError) as err:
        load_config_file(config)
    assert str(config) in str(err.value) and name in str(err.value)


def test_an_error_names_the_flag_too_and_every_bad_setting():
    with pytest.raises(ConfigError) as err:
        SearchConfig(profile="host", budget=0, grace_period_s=-1, refine_timeout_s=-1).validate()
    text = str(err.value)
    assert "budget (--budget)" in text and "grace_period_s (--grace-period)" in text
    assert "refine_timeout_s (config file)" in text


def test_good_settings_pass_and_paths_are_accepted(tmp_path):
    SearchConfig(profile="host", budget=1, output_dir=tmp_path, batch_size=4096, seed=0,
                 max_accuracy_drop=0.0, study_name="a.b-c_1", refine=0).validate()


def test_every_setting_has_one_rule_a_flag_and_a_default():
    """Settings (the rules), the flags and SearchConfig (the defaults) name the same settings."""
    rules = set(Settings.model_fields)
    defaults = {f.name for f in fields(SearchConfig)} - {"runs_root"}
    flags = {a.dest for a in build_parser()._actions if a.dest not in ("help", "version")}
    flags -= set(_NOT_SETTINGS)
    assert rules == defaults
    assert flags == {f.name for f, meta, _ in settings_fields() if meta.flag_of(f.name)}


def test_a_settings_flag_help_and_rule_come_from_its_one_declaration():
    """What ``setting(...)`` declares is what the flag shows and what both a config file
    and the library are held to."""
    declared = {f.name: (f, meta) for f, meta, _ in settings_fields()}
    actions = {a.dest: a for a in build_parser()._actions}
    for name, (_, meta) in declared.items():
        if meta.flag_of(name) is None:
            assert name not in actions
            continue
        assert actions[name].help == meta.help and meta.flag_of(name) in actions[name].option_strings
    field, meta = declared["grace_period_s"]
    assert field.default == 30.0 and meta.rule == {"ge": 0} and meta.flag == "--grace-period"
    with pytest.raises(ConfigError, match=r"grace_period_s \(--grace-period\)"):
        SearchConfig(profile="host", budget=1, grace_period_s=-1).validate()
    with pytest.raises(ConfigError, match="refine_timeout_s \\(config file\\)"):
        SearchConfig(profile="host", budget=1, refine_timeout_s=-1).validate()


def test_default_study_name():
    assert default_study_name("digits", None, "host") == "digits-host"
    assert default_study_name("my.mod:make", "resnet18", "t4-gpu") == "my.mod.make-resnet18-t4-gpu"
    assert default_study_name("x y", None, "p/q") == "x_y-p_q"
    assert default_study_name("digits", None, "host", seed=3) == "digits-host-seed3"


def test_another_seed_is_another_default_study():
    """``--seed 1`` after a seed-0 study must not resume (and show) the seed-0 study."""
    first = SearchConfig(profile="host", budget=2).resolved("host")
    second = SearchConfig(profile="host", budget=2, seed=1).resolved("host")
    assert first.study_name == "digits-host" and second.study_name == "digits-host-seed1"
    assert first.output_dir != second.output_dir
    named = SearchConfig(profile="host", budget=2, seed=1, study_name="mine").resolved("host")
    assert named.study_name == "mine"


def test_resolved_takes_the_environment_below_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    cfg = SearchConfig(profile="host", budget=1, runs_root=tmp_path).resolved("host")
    assert cfg.experiment_name == "from-env" and cfg.study_name == "digits-host"
    assert cfg.output_dir == tmp_path / "digits-host"
    assert cfg.storage == f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    typed = SearchConfig(profile="host", budget=1, experiment_name="typed").resolved("host")
    assert typed.experiment_name == "typed"


def test_config_file_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "exp").mkdir()
    config = tmp_path / "exp" / "c.yaml"
    config.write_text("budget: 2\ndata_dir: data\nteacher: /abs/t.pt\n")
    values = load_config_file(config)
    assert values == {"budget": 2, "data_dir": tmp_path / "exp" / "data",
                      "teacher": Path("/abs/t.pt")}
