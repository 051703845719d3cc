"""Score the model we ship: top-1 accuracy of the final ONNX model in ONNX Runtime."""

from __future__ import annotations

import numpy as np

from search._ort import make_session
from search.errors import TrialError
from search.tasks import Split

__all__ = ["onnx_accuracy"]


def onnx_accuracy(model: bytes, split: Split, *, threads: int = 1, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of ``model`` on ``split``."""
    try:
        session = make_session(model, threads=threads)
    except Exception as exc:
        raise TrialError("evaluate", f"ONNX Runtime cannot load the model: {exc}") from exc
    x = split.x.numpy().astype(np.float32)
    y = split.y.numpy()
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = session.run(None, {"input": x[start : start + batch_size]})[0]
        if not np.all(np.isfinite(logits)):
            raise TrialError("evaluate", "the model produced non-finite logits")
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return 100.0 * correct / len(y)
