import optuna
import pytest
import yaml

from search.errors import ConfigError
from search.record import Layer
from search.spaces import load_space, resolve_space


def test_default_space_resolves_to_profile_precisions(profile, layers):
    resolved = resolve_space(load_space("default"), profile, layers)
    for layer in layers:
        assert set(resolved.layer_precisions[layer.name]) == set(profile.allowed(layer.op_type))


def test_space_asking_a_forbidden_precision_is_rejected(tmp_path, profile):
    path = tmp_path / "fp16.yaml"
    path.write_text(yaml.safe_dump({"name": "wants-fp16",
                                    "quantization": {"precisions": ["fp32", "fp16"]}}))
    with pytest.raises(ConfigError) as err:
        resolve_space(load_space(path), profile, [Layer("stem.0", "Conv")])
    text = str(err.value)
    assert "stem.0" in text and "Conv" in text and "fp16" in text and "allowed: fp32, int8" in text


def test_space_typo_is_rejected(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("pruning:\n  structured_ration: {low: 0, high: 0.5}\n")
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert "structured_ration" in str(err.value) and "structured_ratio" in str(err.value)


def test_inverted_range_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distillation:\n  epochs: {low: 3, high: 1}\n")
    with pytest.raises(ConfigError, match="distillation.epochs"):
        load_space(path)


def test_sampling_stays_inside_the_space(profile, layers):
    resolved = resolve_space(load_space("default"), profile, layers)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(30):
        trial = study.ask()
        choices = resolved.sample(trial)
        assert 0 <= choices.unstructured_sparsity <= 0.8
        assert 0 <= choices.structured_ratio <= 0.6
        assert set(choices.precisions) == {layer.name for layer in layers}
        assert set(choices.precisions.values()) <= {"fp32", "int8"}
        if choices.epochs == 0:
            assert "temperature" not in trial.params  # conditional dimension
        study.tell(trial, [0.0, 1.0])


def test_baselines_are_fp32_then_uniform_u8s8(profile, layers):
    resolved = resolve_space(load_space("default"), profile, layers)
    (label_a, fp32), (label_b, int8) = resolved.baselines()
    assert (label_a, label_b) == ("fp32", "int8")
    assert {v for k, v in fp32.items() if k.startswith("precision.")} == {"fp32"}
    assert {v for k, v in int8.items() if k.startswith("precision.")} == {"int8"}
    assert int8["activation_type"] == "uint8" and int8["per_channel"] is True
