"""Every package the code imports is declared, not left to arrive through another's dependencies."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; pyproject.toml is read, not imported
ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """The normalized distribution name of ``requirement`` (PEP 503)."""
    bare = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", bare).lower()


def _imports(folder: Path) -> set[str]:
    """Top-level modules imported anywhere under ``folder``, the standard library's left out."""
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"search", "tests", "__future__"}


def _undeclared(modules: set[str], declared: set[str]) -> list[str]:
    owners = packages_distributions()
    return sorted(m for m in modules
                  if not {_name(d) for d in owners.get(m, [m])} & declared)


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_package_declares_what_it_imports():
    declared = {_name(r) for r in _project()["dependencies"]}
    assert _undeclared(_imports(ROOT / "search"), declared) == []


def test_the_tests_need_only_the_dev_extra_besides():
    project = _project()
    declared = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    assert _undeclared(_imports(ROOT / "tests"), declared) == []


def test_the_viz_extra_names_the_dashboard():
    assert {_name(r) for r in _project()["optional-dependencies"]["viz"]} == {"optuna-dashboard",
                                                                             "plotly"}
