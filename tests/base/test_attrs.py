"""Every Optuna attribute key has one owner: ``search._base.attrs``.

The package and the benchmarks read and write trial and study attributes only through
``TrialKey`` / ``StudyKey``; a key spelled as a string anywhere else (a typo that reads
``None`` forever, a key added in one module and read under another name elsewhere) fails
here, and so does a key a real study writes that the owner does not declare.
"""

from __future__ import annotations

import ast
from pathlib import Path

import optuna

from search._base.attrs import STUDY_KEYS, TRIAL_KEYS, StudyKey, TrialKey

ROOT = Path(__file__).resolve().parents[2]
OWNER = ROOT / "search" / "_base" / "attrs.py"
# what the package writes today: adding a key means declaring it in the owner and here
EXPECTED_TRIAL = {
    "choices", "layer_precisions", "dropped_blocks", "test_accuracy", "size_mb", "sparsity",
    "macs", "params", "timings", "epoch_accuracy", "latency_ms", "latency_p90_ms",
    "latency_cv", "latency_runs", "latency_source", "latency_noisy", "latency_batch_size",
    "device", "provider", "node", "baseline", "reference", "seed_config", "cached_from",
    "refined_from", "screened_accuracy", "screen_seconds", "failure", "pruned_reason",
    "accuracy_drop", "constraint_values"}
EXPECTED_STUDY = {"task", "latency_source", "preflight", "warnings", "max_accuracy_drop",
                  "max_latency_ms", "refined", "refine_seconds", "remeasured", "seeded", "metric"}


def _is_attrs(node: ast.AST, aliases: set[str]) -> bool:
    """``x.user_attrs`` or a local name bound to one."""
    return (isinstance(node, ast.Attribute) and node.attr == "user_attrs") or (
        isinstance(node, ast.Name) and node.id in aliases)


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _spelled_keys(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line key`` for every attribute key written as a string literal."""
    tree = ast.parse(path.read_text())
    aliases = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and _is_attrs(node.value, set()) for t in node.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and _is_attrs(node.value, aliases):
            key = _literal(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "get" and _is_attrs(node.func.value, aliases) and node.args:
                key = _literal(node.args[0])
            elif node.func.attr == "set_user_attr" and node.args:
                key = _literal(node.args[0])
            for kw in node.keywords:
                if kw.arg == "user_attrs" and isinstance(kw.value, ast.Dict):
                    key = key or next((k for k in map(_literal, kw.value.keys) if k), None)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn))
                                                   for op in node.ops):
            if any(_is_attrs(c, aliases) for c in node.comparators):
                key = _literal(node.left)
        if key is not None:
            found.append(f"{path.relative_to(root)}:{node.lineno} {key!r}")
    return sorted(found, key=lambda hit: int(hit.split(":")[1].split()[0]))


def test_no_attribute_key_is_spelled_outside_its_owner():
    files = [p for d in ("search", "experiments") for p in (ROOT / d).rglob("*.py") if p != OWNER]
    spelled = [hit for p in files for hit in _spelled_keys(p)]
    assert not spelled, "use TrialKey / StudyKey from search._base.attrs:\n" + "\n".join(spelled)


def test_the_scan_sees_each_way_a_key_is_spelled(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("a = t.user_attrs\nx = a.get('k1')\ny = t.user_attrs['k2']\n"
                      "z = 'k3' in t.user_attrs\nt.set_user_attr('k4', 1)\n"
                      "s.enqueue_trial({}, user_attrs={'k5': 1})\nok = a.get(TrialKey.K)\n")
    keys = [hit.rsplit(" ", 1)[1] for hit in _spelled_keys(source, tmp_path)]
    assert keys == ["'k1'", "'k2'", "'k3'", "'k4'", "'k5'"]


def test_the_owner_declares_what_the_package_writes():
    assert TRIAL_KEYS == EXPECTED_TRIAL
    assert STUDY_KEYS == EXPECTED_STUDY
    assert set(TrialKey.MEASUREMENT) <= TRIAL_KEYS and set(TrialKey.ORIGIN) <= TRIAL_KEYS


def test_a_real_study_writes_only_declared_keys(task, tmp_path):
    """A short study on the real loop (Optuna, ONNX Runtime, the driver): every key it
    leaves is declared by the owner."""
    from tests.support.driver import ONE_SHOT_TWO_MODELS, run_driver

    study, _ = run_driver(task, tmp_path, ONE_SHOT_TWO_MODELS, budget=3, max_accuracy_drop=1.0)
    written = {k for t in study.trials for k in t.user_attrs}
    assert written and written <= TRIAL_KEYS, written - TRIAL_KEYS
    assert set(study.user_attrs) <= STUDY_KEYS, set(study.user_attrs) - STUDY_KEYS
    assert study.user_attrs[StudyKey.MAX_ACCURACY_DROP] == 1.0
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
