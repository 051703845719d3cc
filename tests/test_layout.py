"""The test tree's layout: what tests share lives in ``tests/support/`` (or ``tests/families.py``),
never in a conftest imported as a module or in another test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _imports(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, dotted name) of every module, and every name imported from a module, in a
    module of ``package``: ``from tests import conftest`` gives ``tests`` and
    ``tests.conftest``; relative imports are resolved against ``package``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names
                      if alias.name != "*"]
    return found


def _forbidden(dotted: str) -> str | None:
    """Why importing ``dotted`` is not allowed, or None."""
    parts = dotted.split(".")
    if parts[0] == "conftest" or (parts[0] == "tests" and "conftest" in parts):
        return "a conftest (fixtures and hooks only: import helpers from tests.support)"
    if parts[0] == "tests" and any(part.startswith("test_") for part in parts):
        return "a test module (move what is shared into tests.support)"
    return None


def test_no_module_imports_a_conftest_or_a_test_module():
    """No file under tests/ imports a conftest or another test module: shared helpers live
    in tests/support/, fixtures in a conftest, where pytest finds them by name."""
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        package = list(path.relative_to(ROOT).parts[:-1])
        seen: set[int] = set()
        for line, dotted in _imports(path.read_text(), package):
            why = _forbidden(dotted)
            if why and line not in seen:  # once a statement: `from m import x` names m and m.x
                seen.add(line)
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {dotted}, {why}")
    assert not wrong, "\n".join(wrong)


def test_the_layout_check_sees_every_way_of_importing():
    """The check itself: each spelling of a forbidden import is caught, helpers pass."""
    assert _forbidden("tests.conftest") and _forbidden("tests.tasks.conftest")
    assert _forbidden("conftest")
    assert _forbidden("tests.study.test_driver") and _forbidden("tests.test_cli.free_port")
    assert not _forbidden("tests.support.helpers.done_rows")
    assert not _forbidden("tests.families.make_series_task")
    assert not _forbidden("search.trial.compress")
    relative = "from . import conftest\nfrom .test_driver import _run\nfrom ..support import models\n"
    assert [d for _, d in _imports(relative, ["tests", "study"]) if _forbidden(d)] == \
        ["tests.study.conftest", "tests.study.test_driver", "tests.study.test_driver._run"]
