"""Scoring the exported model with a task's metric."""

from __future__ import annotations

import torch
from torch import nn

from search.compress import export_onnx
from search.evaluate import onnx_accuracy, onnx_score
from search.tasks import Split, top1_accuracy


def test_onnx_score_uses_the_metric_and_top1_is_the_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    split = Split(torch.randn(300, 1, 4, 4), torch.randint(0, 3, (300,)))
    onnx = export_onnx(model, (1, 4, 4))
    with torch.no_grad():
        expected = top1_accuracy(model(split.x), split.y)
    assert onnx_accuracy(onnx, split, batch_size=128) == expected
    assert onnx_score(onnx, split, lambda logits, y: float(len(logits) == len(y))) == 1.0
