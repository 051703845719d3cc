"""The layer types that carry a model's MACs: what gets a precision, zeros and a width.

One definition, so that a volumetric or video model's ``nn.Conv3d`` is pruned,
sparsified and quantized by every stage alike (each stage once listed its own
types, and 3-D convolutions were left out of all of them).
"""

from __future__ import annotations

from torch import nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHTED = (*CONV, nn.Linear)
# get a precision (ONNX Runtime's dynamic int8 LSTM on CPUs; a GRU's int8 runs unrolled into
# MatMuls) and a hidden width (recurrent.py); no zeros of their own. nn.RNN gets a width only
RECURRENT = (nn.LSTM, nn.GRU)
