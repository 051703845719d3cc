"""The checks that need no model, run before torch, Ray and MLflow are imported.

A study refuses bad input before it writes anything; these checks read only
the settings, the profile and space files, and the network, so the command
line answers a typo in a fraction of a second instead of after the 5-10 s it
takes to import the machinery. :func:`search.study.run.run_search` runs them too,
for callers from Python.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from search._base.errors import ConfigError
from search._base.net import server_address, server_reachable
from search._base.redact import redact
from search.config import SearchConfig, ensure_writable
from search.profiles import HardwareProfile, load_profile, measurable_here, with_batch_size
from search.space.schema import SearchSpace, load_space

__all__ = ["Checked", "check_address", "check_inputs", "check_latency_mode", "check_tracking_uri",
           "prepare_directories", "server_reachable"]


@dataclass(frozen=True)
class Checked:
    """Settings resolved against their profile, and what the checks found out."""

    config: SearchConfig
    profile: HardwareProfile
    space: SearchSpace
    measurable: bool  # this machine can measure the profile
    why: str  # why it cannot, when it cannot


def check_inputs(config: SearchConfig) -> Checked:
    """Every check that needs neither the model nor the data, in the order a user fixes them."""
    profile = load_profile(config.profile)
    cfg = config.resolved(profile.name)
    profile = with_batch_size(profile, cfg.batch_size)
    space = load_space(cfg.space)
    measurable, why = measurable_here(profile)
    check_latency_mode(cfg, profile, measurable, why)
    check_address(cfg.ray_address)
    check_tracking_uri(cfg.tracking_uri)
    return Checked(cfg, profile, space, measurable, why)


def prepare_directories(cfg: SearchConfig) -> None:
    """Create the output and runs directories, or say why they cannot be written: the last
    check, as it is the first that leaves something on disk."""
    ensure_writable(Path(cfg.output_dir), "output directory")
    if cfg.storage.startswith("sqlite:///") or cfg.tracking_uri is None:
        ensure_writable(Path(cfg.runs_root), "runs directory")


def check_latency_mode(cfg: SearchConfig, profile: HardwareProfile, measurable: bool,
                        why: str) -> None:
    """Fail before any work when the requested latency source cannot be had."""
    if cfg.latency == "measure" and not measurable and cfg.ray_address is None:
        raise ConfigError(
            f"--latency measure: profile {profile.name!r} cannot be measured on this machine "
            f"({why}); join a Ray cluster with a node that advertises {profile.resource!r} "
            "(--ray-address), or use --latency predict"
        )
    will_predict = cfg.latency == "predict" or (not measurable and cfg.ray_address is None)
    if will_predict and profile.latency_model is None:
        raise ConfigError(
            f"profile {profile.name!r} cannot be measured here ({why}) and has no "
            "latency_model to predict with; add one to the profile"
        )


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail within seconds, before anything is written, when a cluster address is unreachable.

    ``ray.init`` itself retries for a long time; a plain TCP connect answers fast.
    """
    if address is None or address == "auto":
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} is not auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r}: "
                          f"{exc.strerror or type(exc).__name__} (waited at most {timeout_s:.0f} s)"
                          ) from None


def check_tracking_uri(uri: str | None, timeout_s: float = 5.0) -> None:
    """Fail within seconds, before any training, when a tracking server cannot be reached."""
    if uri is None:
        return
    if "://" in uri and uri.split("://", 1)[0] in ("http", "https") and server_address(uri) is None:
        raise ConfigError(f"--tracking-uri {redact(uri)!r} is not a valid http(s) URL "
                          "(http://host:port)")
    if not server_reachable(uri, timeout_s):
        host, port = server_address(uri)  # type: ignore[misc]
        raise ConfigError(
            f"cannot reach the MLflow tracking server at {redact(uri)} ({host}:{port} refused "
            f"or did not answer within {timeout_s:.0f} s); start it, fix --tracking-uri, or "
            "leave it out to track in a local SQLite store"
        )


