"""Hardware-aware compression search: the whole accuracy/latency Pareto front, on the device."""

from search._base.errors import ConfigError, SearchError, TrialError
from search._base.records import Choices, LatencyStats, Layer, TrialRecord
from search.config import SearchConfig
from search.profiles import HardwareProfile, available_profiles, load_profile
from search.space.resolve import resolve_space
from search.space.schema import SearchSpace, available_spaces, load_space

__all__ = [
    "Choices",
    "ConfigError",
    "HardwareProfile",
    "LatencyStats",
    "Layer",
    "SearchConfig",
    "SearchError",
    "SearchSpace",
    "TrialError",
    "TrialRecord",
    "available_profiles",
    "available_spaces",
    "load_profile",
    "load_space",
    "resolve_space",
    "run_search",
]


def __getattr__(name: str):  # noqa: ANN202
    # run_search pulls in Ray and MLflow; import it only when asked for.
    if name == "run_search":
        from search.study.run import run_search

        return run_search
    raise AttributeError(name)
