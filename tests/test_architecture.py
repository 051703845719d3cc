"""The package's shape holds: no import circle, modules of one job each (none over 450
lines), and the low layers never reach up into the study's machinery."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "search"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at its top or inside a function), as full names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                      else node.module for a in node.names}
    return names


def _package_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for imported in _imports(path):
            while imported and imported not in MODULES:  # a name inside a module
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                deps.add(imported)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_circle():
    cycle = _cycle(_package_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_holds_more_than_one_job():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their jobs): {long}"


def _reaches(prefix: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for name, path in MODULES.items():
        if name == prefix or name.startswith(prefix + "."):
            bad = sorted(i for i in _imports(path) if i.split(".")[0] in forbidden
                         or any(i == f or i.startswith(f + ".") for f in forbidden))
            if bad:
                out[name] = bad
    return out


def test_the_latency_package_reads_onnx_not_the_study_or_torch():
    """Measuring and predicting take ONNX models: no Ray, MLflow, torch, nor the trial's
    torch-side code or the study's policy."""
    assert _reaches("search.latency", ("ray", "mlflow", "torch", "torchvision", "search.trial",
                                       "search.study", "search.results", "search.tasks")) == {}


def test_the_shared_base_and_the_settings_stay_below_everything():
    assert _reaches("search._base", ("search.study", "search.trial", "search.results",
                                     "search.space", "search.latency", "search.tasks",
                                     "search.cli", "search.config", "ray", "mlflow")) == {}
    assert _reaches("search.config", ("search.tasks", "search.study", "search.trial",
                                      "search.results", "torch", "ray", "mlflow")) == {}
    assert _reaches("search.space", ("search.study", "search.trial", "search.results",
                                     "optuna", "torch", "ray", "mlflow")) == {}
    assert _reaches("search.results", ("search.study", "search.trial", "search.cli",
                                       "search.checks", "ray", "torch")) == {}
