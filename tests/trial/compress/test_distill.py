"""Distillation losses: each kind trains, and its own term goes down."""

import pytest
import torch

from search.tasks import Split
from search.trial.compress import export_onnx
from search.trial.compress.distill import (
    LOGITS,
    _adapter,
    _Capture,
    distill,
    feature_taps,
    relation_loss,
    teacher_outputs,
)
from search.trial.compress.prune import prune_structured
from search.trial.evaluate import onnx_accuracy


def test_feature_taps_are_the_last_stages(task):
    assert feature_taps(task.teacher(), task.train.x[:2]) == ["layer1", "layer2", "layer3"]


def test_feature_distillation_lowers_the_hint_loss_of_a_pruned_student(task):
    student = task.teacher()
    prune_structured(student, torch.zeros(1, *task.input_shape), 0.5, 8)
    taps = feature_taps(task.teacher(), task.train.x[:2])
    s, t = _Capture(student, taps), _Capture(task.teacher(), taps)
    # channels differ after pruning, so the hints go through 1x1 adapters
    assert all(isinstance(_adapter(s.values.get(n, torch.zeros(2, 16, 8, 8)),
                                   torch.zeros(2, 32, 8, 8)), torch.nn.Conv2d) for n in taps)
    s.close()
    t.close()
    history: dict[str, list[float]] = {}
    distill(student, task.teacher(), task.train, epochs=2, lr=3e-3, temperature=4.0, alpha=0.5,
            seed=0, loss="feature", loss_weight=5.0, history=history)
    assert len(history["feature"]) == 2
    assert history["feature"][1] < 0.8 * history["feature"][0]
    assert onnx_accuracy(export_onnx(student, task.input_shape), task.val) > 90


def _refusing_batches(teacher: torch.nn.Module) -> torch.nn.Module:
    """The teacher may run on the probe of two inputs that sizes adapters, never on a batch."""
    def refuse(module, args):  # noqa: ANN001, ANN202, ARG001
        assert len(args[0]) <= 2, "the teacher ran on a batch although its values were kept"
    teacher.register_forward_pre_hook(refuse)
    return teacher


@pytest.mark.parametrize("loss", ["response", "feature", "relation"])
def test_distillation_from_the_teachers_kept_values_trains_the_same_student(task, loss):
    part = Split(task.train.x[:320], task.train.y[:320])
    kept = teacher_outputs(task.teacher(), part.x, max_bytes=2**28, loss=loss, batch_size=100)
    assert kept[LOGITS].shape == (320, 10)
    assert len(kept) == {"response": 1, "feature": 4, "relation": 2}[loss]
    students = []
    for teacher, values in ((task.teacher(), None), (_refusing_batches(task.teacher()), kept)):
        student = task.teacher()
        prune_structured(student, torch.zeros(1, *task.input_shape), 0.5, 8)
        distill(student, teacher, part, epochs=2, lr=3e-3, temperature=4.0, alpha=0.7, seed=0,
                loss=loss, teacher_values=values)
        students.append(student.state_dict())
    for name, value in students[0].items():
        torch.testing.assert_close(students[1][name], value, rtol=1e-4, atol=1e-5)
    # values beyond the bound are not kept: the teacher then runs in every batch
    assert teacher_outputs(task.teacher(), part.x, max_bytes=320 * 10 * 4 - 1) is None


def test_relation_loss_is_zero_for_the_same_embedding_and_scale_free():
    e = torch.randn(16, 8)
    assert float(relation_loss(e, e)) == pytest.approx(0.0, abs=1e-6)
    assert float(relation_loss(3 * e, e)) == pytest.approx(0.0, abs=1e-5)  # distances normalised
    assert float(relation_loss(torch.randn(16, 8), e)) > 0.01


def test_relation_distillation_trains_a_pruned_student(task):
    student = task.teacher()
    prune_structured(student, torch.zeros(1, *task.input_shape), 0.5, 8)
    one_shot = onnx_accuracy(export_onnx(student, task.input_shape), task.val)
    distill(student, task.teacher(), task.train, epochs=2, lr=3e-3, temperature=4.0, alpha=0.5,
            seed=0, loss="relation", loss_weight=1.0)
    tuned = onnx_accuracy(export_onnx(student, task.input_shape), task.val)
    assert tuned > max(one_shot, 90)
    history: dict[str, list[float]] = {}
    part = Split(task.train.x[:256], task.train.y[:256])  # the term is logged: no need of all
    distill(student, task.teacher(), part, epochs=1, lr=1e-3, temperature=4.0, alpha=0.5,
            seed=1, loss="relation", loss_weight=1.0, history=history)
    assert history["relation"][0] > 0


def test_unknown_loss_is_refused(task):
    with pytest.raises(ValueError, match="response, feature, relation"):
        distill(task.teacher(), task.teacher(), task.train, epochs=1, lr=1e-3, temperature=4.0,
                alpha=0.5, seed=0, loss="attention")


@pytest.mark.parametrize("family", ["conv1d", "conv3d"])
def test_feature_hints_adapt_the_pruned_width_of_every_layout(family):
    """Channels-first maps of 1 and 3 spatial dimensions (signals, video) get a 1x1 Conv1d /
    Conv3d over channels, token sequences (N, L, D) a Linear over D; a Conv1d net's hints
    once went through a Linear over its length and failed on the channel mismatch."""
    from search.trial.compress.prune import prune_structured
    from tests.families import FAMILIES

    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    teacher = build().eval()
    student = build()
    student.load_state_dict(teacher.state_dict())
    prune_structured(student, torch.zeros(1, *shape), 0.5, 8)
    data = Split(torch.randn(32, *shape), torch.randint(0, 10, (32,)))
    history: dict[str, list[float]] = {}
    distill(student, teacher, data, epochs=1, lr=1e-3, temperature=4.0, alpha=0.5, seed=0,
            loss="feature", history=history)
    assert history["feature"][0] > 0
    s = torch.zeros(2, 8, *shape[1:])
    t = torch.zeros(2, 16, *shape[1:])
    assert isinstance(_adapter(s, t), {2: torch.nn.Conv1d, 4: torch.nn.Conv3d}[len(shape)])
    assert isinstance(_adapter(torch.zeros(2, 10, 16), torch.zeros(2, 10, 32)), torch.nn.Linear)
