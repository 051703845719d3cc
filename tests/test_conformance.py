"""Every technique on every common model family: it applies, or the package says why not.

Each cell runs one trial's compress stage (prune, export, quantize, score in
ONNX Runtime) on a small model with random weights; fp32 cells must also match
the PyTorch student. ``CONFORMANCE_TABLE`` (an environment variable naming a
file) receives the family x technique table the README shows.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from search._base.records import Choices, TrialRecord
from search.tasks import Split, Task, logits_of
from search.trial.compress.applicable import TECHNIQUES, applicable
from search.trial.pipeline import compress, prune_student, student_layers
from tests.families import CLASSES
from tests.families import FAMILIES as BUILT_THE_USUAL_WAYS
from tests.support.dense_families import DENSE_FAMILIES, dense_task
from tests.support.recurrent_families import RECURRENT_FAMILIES

FAMILIES = {**BUILT_THE_USUAL_WAYS, **RECURRENT_FAMILIES,
            **{name: (f.build, f.shape) for name, f in DENSE_FAMILIES.items()}}

_FP32 = {"structured", "drop_blocks", "heads", "sparsity", "fp32"}
# cells whose verdict is pinned: layer dropping goes by structure, not by class names
_OFFERED = {("conv1d-resnet-custom", "drop_blocks"): True,
            ("inline-residual", "drop_blocks"): True,
            ("mlp-no-bn", "drop_blocks"): False,
            # recurrent layers have a width of their own (hidden units), pruned by our code
            ("gru", "structured"): True, ("gru-2layer", "structured"): True,
            ("bilstm-2layer", "structured"): True}
_RESULTS: dict[tuple[str, str], str] = {}


def _task(family: str) -> Task:
    """Random data and a randomly initialised teacher of ``family``."""
    if family in DENSE_FAMILIES:
        return dense_task(family)
    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randn(n, *shape, generator=gen),
                     torch.randint(0, CLASSES, (n,), generator=gen))

    return Task(name=family, make_model=build, teacher_state=model.state_dict(),
                train=split(64), val=split(16), test=split(16), input_shape=shape,
                num_classes=CLASSES)


def _choices(technique: str, task: Task) -> Choices:
    """The technique at a non-trivial setting, nothing else."""
    int8 = {layer.name: "int8" for layer in student_layers(task)}
    return {
        "structured": Choices(structured_ratio=0.5),
        "drop_blocks": Choices(drop_blocks=1),
        "heads": Choices(head_ratio=0.5),
        "sparsity": Choices(unstructured_sparsity=0.5),
        "int8_static": Choices(precisions=int8, calibration_samples=32),
        "int8_dynamic": Choices(precisions=int8, quant_mode="dynamic"),
        "fp32": Choices(),
    }[technique]


def _assert_applied(technique: str, task: Task, record: TrialRecord) -> None:
    """The technique left its mark: fewer parameters, zeros, or integer ops."""
    if technique in ("structured", "drop_blocks", "heads"):
        full = sum(p.numel() for p in task.teacher().parameters())
        assert record.params < full, f"{technique} removed nothing"
    if technique == "sparsity":
        assert record.sparsity > 0.4
    ops = {n.op_type for n in onnx.load_from_string(record.onnx_model).graph.node}
    if technique == "int8_static":
        assert "QuantizeLinear" in ops, ops
    if technique == "int8_dynamic":
        assert ops & {"ConvInteger", "MatMulInteger"}, ops


def _run_onnx(model: bytes, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.fixture(scope="module", autouse=True)
def _table():
    """Print the table after the matrix ran, and write it where CONFORMANCE_TABLE says."""
    yield
    text = conformance_table(_RESULTS)
    print("\n" + text)
    if os.environ.get("CONFORMANCE_TABLE"):
        Path(os.environ["CONFORMANCE_TABLE"]).write_text(text + "\n")


def conformance_table(results: dict[tuple[str, str], str]) -> str:
    """A Markdown family x technique table of the cells that ran."""
    families = [f for f in FAMILIES if any((f, t) in results for t in TECHNIQUES)]
    lines = ["| family | " + " | ".join(TECHNIQUES) + " |",
             "|---" * (len(TECHNIQUES) + 1) + "|"]
    for f in families:
        lines.append(f"| {f} | " + " | ".join(results.get((f, t), "") for t in TECHNIQUES) + " |")
    return "\n".join(lines)


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_technique_applies_or_is_not_offered(family, technique, profile):
    task = _task(family)
    example = torch.zeros(1, *task.input_shape)
    with torch.no_grad():
        expected_shape = (4, *logits_of(task.teacher()(example)).shape[1:])
    ok, why = applicable(task.teacher(), technique, example)
    assert ok == _OFFERED.get((family, technique), ok), why or "offered"
    if not ok:
        assert why
        _RESULTS[family, technique] = f"not offered: {why}"
        return
    start = time.perf_counter()
    choices = _choices(technique, task)
    record = compress(TrialRecord(0, dataclasses.replace(choices)), task, profile)
    assert record.error is None and record.accuracy is not None
    x = task.val.x[:4]
    out = _run_onnx(record.onnx_model, x)
    assert out.shape == expected_shape and np.isfinite(out).all()
    if technique in _FP32:
        student = prune_student(TrialRecord(0, dataclasses.replace(choices)), task, profile)
        with torch.no_grad():
            expected = logits_of(student(x)).numpy()
        np.testing.assert_allclose(out, expected, atol=1e-3, rtol=1e-3)
    _assert_applied(technique, task, record)
    _RESULTS[family, technique] = f"applied ({time.perf_counter() - start:.1f} s)"
