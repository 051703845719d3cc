"""Latency of a model on a profile's device."""

from search.latency.measure import measure_latency, summarize

__all__ = ["measure_latency", "summarize"]
