"""Fixtures of the task tests: small datasets the project does not ship."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.plugins import write_digits_tree


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory) -> Path:
    """300 digits: 20 per class in train/, 10 per class in val/ (no test/: val is halved)."""
    return write_digits_tree(tmp_path_factory.mktemp("digits-tree"), {"train": 20, "val": 10})
