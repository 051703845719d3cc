from pathlib import Path

import pytest
import yaml

from search._base.errors import ConfigError
from search.profiles import (
    PROFILES_DIR,
    available_profiles,
    host_cpu_flags,
    load_profile,
    measurable_here,
)


def test_builtin_profiles_load():
    names = available_profiles()
    assert {"cpu-avx512-vnni", "cpu-avx2"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.resource == f"hw:{name}"


def test_cpu_profiles_offer_no_fp16():
    for name in ("cpu-avx512-vnni", "cpu-avx2"):
        profile = load_profile(name)
        for op in ("Conv", "Gemm"):
            assert "fp16" not in profile.allowed(op)


def test_unknown_profile_lists_known():
    with pytest.raises(ConfigError) as err:
        load_profile("no-such-device")
    assert "no-such-device" in str(err.value)
    assert "cpu-avx512-vnni" in str(err.value)


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _base() -> dict:
    return yaml.safe_load((PROFILES_DIR / "cpu-avx512-vnni.yaml").read_text())


def test_unknown_field_names_file_field_and_allowed(tmp_path):
    data = _base()
    data["measure"]["thread"] = 2  # typo of "threads"
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    text = str(err.value)
    assert str(path) in text and "measure.thread" in text and "threads" in text


def test_bad_precision_names_allowed_values(tmp_path):
    data = _base()
    data["precisions"]["Conv"] = ["fp32", "int9"]
    with pytest.raises(ConfigError) as err:
        load_profile(_write(tmp_path, data))
    assert "precisions.Conv" in str(err.value) and "int8" in str(err.value)


def test_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(_write(tmp_path, "name: [unclosed\n"))


def test_value_out_of_range(tmp_path):
    data = _base()
    data["measure"]["threads"] = 0
    with pytest.raises(ConfigError, match="measure.threads"):
        load_profile(_write(tmp_path, data))


@pytest.mark.parametrize(("section", "field", "value"), [
    ("latency_model", "channel_block", {"fp32": 0}),  # a block of no channels
    ("int8", "fast_activation_symmetric", []),  # none fast: the default space could offer none
    ("int8", "fast_activation_types", []),
])
def test_values_no_device_has_are_refused(tmp_path, section, field, value):
    data = _base()
    data[section][field] = value
    with pytest.raises(ConfigError, match=f"{section}.{field}"):
        load_profile(_write(tmp_path, data))


def _cpuinfo_flags() -> set[str]:
    """The first 'flags' line of /proc/cpuinfo, read here rather than through the product."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo: host detection is Linux-only")
    line = next((x for x in info.read_text().splitlines() if x.startswith("flags")), None)
    if line is None:
        pytest.skip("/proc/cpuinfo has no flags line on this architecture")
    return set(line.split(":", 1)[1].split())


def test_host_detection_matches_cpuinfo():
    """Which built-in CPU profile measures here, stated per host kind and checked against
    /proc/cpuinfo as read by the test: VNNI hosts get cpu-avx512-vnni and not cpu-avx2,
    AVX2 hosts without VNNI (this machine) get cpu-avx2 and are told what they lack."""
    from tests.support.profiles import host_builtin

    flags = _cpuinfo_flags()
    assert host_cpu_flags() == flags
    vnni_ok, vnni_why = measurable_here(load_profile("cpu-avx512-vnni"))
    avx2_ok, avx2_why = measurable_here(load_profile("cpu-avx2"))
    if {"avx2", "avx512f", "avx512_vnni"} <= flags:
        assert vnni_ok and not avx2_ok, (vnni_why, avx2_why)
        assert host_builtin() == "cpu-avx512-vnni"
    elif {"avx2", "fma"} <= flags:
        assert not vnni_ok and "lacks" in vnni_why and "avx512" in vnni_why, vnni_why
        assert avx2_ok, avx2_why
        assert host_builtin() == "cpu-avx2"
    else:
        assert not vnni_ok and not avx2_ok


def test_required_builtins_exist_and_legacy_devices_say_so():
    names = set(available_profiles())
    assert {"cpu-avx2", "cpu-avx512-vnni", "t4-gpu", "a100-gpu", "h100-gpu", "fpga", "vpu",
            "gna", "npu", "host"} <= names
    for name in ("vpu", "gna"):
        assert "removed" in load_profile(name).legacy
    assert load_profile("vpu").precisions_used() == ["fp16"]
    assert set(load_profile("gna").precisions_used()) <= {"int8", "int16"}


def test_every_profile_can_be_predicted_or_measured():
    for name in available_profiles():
        profile = load_profile(name)
        assert profile.latency_model is not None or measurable_here(profile)[0], name


def test_host_profile_matches_this_machine():
    host = load_profile("host")
    assert host.name == "host" and host.device_class == "cpu"
    assert measurable_here(host)[0]
    if {"avx512_vnni", "avx512f"} <= host_cpu_flags():
        assert host.precisions == load_profile("cpu-avx512-vnni").precisions


def test_avx2_profile_is_measured_exactly_where_vnni_is_absent():
    """On a VNNI host cpu-avx2 is refused (its numbers would be a VNNI CPU's); on an AVX2 host
    without VNNI, such as this one, it is the profile that measures."""
    flags = _cpuinfo_flags()
    ok, why = measurable_here(load_profile("cpu-avx2"))
    if "avx512_vnni" in flags:
        assert not ok and "avx512_vnni" in why, why
    elif {"avx2", "fma"} <= flags:
        assert ok, why
    else:
        assert not ok and "avx2" in why, why


def test_latency_model_must_price_every_allowed_precision(tmp_path):
    data = yaml.safe_load((PROFILES_DIR / "t4-gpu.yaml").read_text())
    del data["latency_model"]["peak_tops"]["fp16"]
    path = tmp_path / "t4.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="fp16"):
        load_profile(path)


def test_a_precision_the_pipeline_cannot_run_is_refused_at_load_time(tmp_path):
    """bf16 is a precision name (an A100 runs it) but no trial could score a bf16 model here:
    refused when the profile loads, naming what is allowed, not in every trial."""
    data = _base()
    data["precisions"]["Conv"] = ["fp32", "bf16"]
    data["latency_model"]["peak_tops"]["bf16"] = 1.0
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    message = str(err.value)
    assert "precisions" in message and "op type Conv lists bf16" in message
    assert "allowed: fp32, fp16, int16, int8, int4" in message
