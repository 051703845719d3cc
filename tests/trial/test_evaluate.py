"""Scoring the exported model with a task's metric."""

from __future__ import annotations

import torch
from torch import nn

from search.tasks import Split, top1_accuracy
from search.trial.compress import export_onnx
from search.trial.evaluate import onnx_accuracy, onnx_score


def test_onnx_score_uses_the_metric_and_top1_is_the_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    split = Split(torch.randn(300, 1, 4, 4), torch.randint(0, 3, (300,)))
    onnx = export_onnx(model, (1, 4, 4))
    with torch.no_grad():
        expected = top1_accuracy(model(split.x), split.y)
    assert onnx_accuracy(onnx, split, batch_size=128) == expected
    assert onnx_score(onnx, split, lambda logits, y: float(len(logits) == len(y))) == 1.0


def test_scoring_sessions_let_idle_threads_sleep_and_measuring_ones_spin(monkeypatch):
    """Scoring gives the same numbers either way; only measurement keeps ONNX Runtime's
    busy-waiting default, as deployments run it."""
    import search.trial.evaluate
    from search._base.ort import make_session

    onnx = export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval(), (1, 4, 4))
    made = []

    def recording(model, **kwargs):  # noqa: ANN001, ANN202
        made.append(make_session(model, **kwargs))
        return made[-1]

    monkeypatch.setattr(search.trial.evaluate, "make_session", recording)
    onnx_score(onnx, Split(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))))

    def spinning(session) -> str:  # noqa: ANN001
        try:
            return session.get_session_options().get_session_config_entry(
                "session.intra_op.allow_spinning")
        except RuntimeError:  # not set: ONNX Runtime's default, which spins
            return "default"

    assert [spinning(s) for s in made] == ["0"]
    assert spinning(make_session(onnx, threads=1)) == "default"
