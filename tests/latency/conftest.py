"""Fixtures of the latency tests: the digits teacher, pruned to several widths and exported."""

import pytest
import torch

from search.trial.compress import export_onnx, prune_structured


def _pruned(task, ratio):
    model = task.teacher()
    prune_structured(model, torch.zeros(1, *task.input_shape), ratio, round_to=8)
    return export_onnx(model, task.input_shape)


@pytest.fixture(scope="module")
def pruned_models(task):
    return {ratio: _pruned(task, ratio) for ratio in (0.0, 0.25, 0.5)}
