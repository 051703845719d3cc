"""Score the model we ship: the task's metric on the final ONNX model in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import torch

from search._base.errors import TrialError
from search._base.ort import as_input, make_session
from search.tasks import Metric, Split, top1_accuracy

__all__ = ["onnx_accuracy", "onnx_score"]


def onnx_score(model: bytes, split: Split, metric: Metric = top1_accuracy, *, threads: int = 1,
               batch_size: int = 256) -> float:
    """``metric(logits, labels)`` of ``model`` on ``split`` (a task's ``Task.metric``)."""
    try:
        session = make_session(model, threads=threads, spinning=False)
    except Exception as exc:
        raise TrialError("evaluate", f"ONNX Runtime cannot load the model: {exc}") from exc
    x = as_input(split.x.numpy())
    outputs = []
    for start in range(0, len(x), batch_size):
        logits = session.run(None, {"input": x[start : start + batch_size]})[0]
        if not np.all(np.isfinite(logits)):
            raise TrialError("evaluate", "the model produced non-finite logits")
        outputs.append(logits)
    return float(metric(torch.from_numpy(np.concatenate(outputs)), split.y))


def onnx_accuracy(model: bytes, split: Split, *, threads: int = 1, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of ``model`` on ``split``."""
    return onnx_score(model, split, top1_accuracy, threads=threads, batch_size=batch_size)
