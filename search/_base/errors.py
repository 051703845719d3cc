"""Errors the user can act on.

Every error meant for the user derives from :class:`SearchError`; the CLI
prints its message and exits with its ``exit_code`` instead of a traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "SearchError", "TrialError"]


class SearchError(Exception):
    """An error whose message is written for the user."""

    exit_code = 1


class ConfigError(SearchError):
    """Bad input: a flag, a profile, a space or a config file."""

    exit_code = 2


class TrialError(SearchError):
    """A trial failed in one stage; the study records it and goes on."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
