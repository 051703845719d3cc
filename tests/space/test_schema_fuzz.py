"""Loaders fuzzed with Hypothesis: a valid object or our ConfigError, never another exception."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search._base.errors import ConfigError
from search._base.schema import load_model, validate_model
from search.config import Settings
from search.profiles import PROFILES_DIR, HardwareProfile
from search.space.schema import SearchSpace

MODELS = (HardwareProfile, SearchSpace, Settings)
KEYS = st.sampled_from([
    "name", "device_class", "precisions", "Conv", "Gemm", "int8", "measure", "threads",
    "latency_model", "peak_tops", "fp32", "int8", "pruning", "structured_ratio", "low", "high",
    "step", "log", "quantization", "precisions", "budget", "profile", "seed", "parallel",
    "distillation", "epochs", "activation_types", "activation_type", "quant_mode",
    "sparse_kernels", "channel_multiple",
]) | st.text(max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["fp32", "int8", "fp16", "auto", "cpu", "uint8", "none"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(KEYS, inner, max_size=5), max_leaves=20)
DOCS = st.dictionaries(KEYS, VALUES, max_size=8)
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(doc=DOCS | VALUES, model=st.sampled_from(MODELS))
def test_random_documents_load_or_raise_config_error(doc, model):
    try:
        validate_model(model, doc, "fuzz.yaml")
    except ConfigError as exc:
        assert "fuzz.yaml" in str(exc)


def _mutations():
    base = yaml.safe_load((PROFILES_DIR / "cpu-avx512-vnni.yaml").read_text())
    paths = [("name",), ("precisions", "Conv"), ("measure", "threads"), ("int8",),
             ("latency_model", "peak_tops", "int8"), ("channel_multiple",), ("requires",)]
    return st.tuples(st.just(base), st.sampled_from(paths), VALUES)


@FUZZ
@given(case=_mutations())
def test_mutated_builtin_profile_loads_or_raises_config_error(case):
    base, path, value = case
    doc = yaml.safe_load(yaml.safe_dump(base))
    target = doc
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(target, dict) else {}
    if isinstance(target, dict):
        target[path[-1]] = value
    try:
        validate_model(HardwareProfile, doc, "mutated.yaml")
    except ConfigError:
        pass


@FUZZ
@given(data=st.text(max_size=200).map(str.encode) | st.binary(max_size=200),
       model=st.sampled_from(MODELS))
def test_random_files_load_or_raise_config_error(tmp_path_factory, data, model):
    """Any text, and bytes that are not UTF-8 at all."""
    path = tmp_path_factory.mktemp("fuzz") / "doc.yaml"
    path.write_bytes(data)
    try:
        load_model(model, path)
    except ConfigError:
        pass
