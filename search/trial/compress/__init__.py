"""The compression stages of a trial: prune, distil (with QAT), export, quantize."""

from search.trial.compress.blocks import drop_blocks
from search.trial.compress.distill import distill, teacher_outputs
from search.trial.compress.export import compressible_layers, export_onnx, onnx_node_names
from search.trial.compress.prune import (
    count_zero_fraction,
    prune_structured,
    prune_unstructured,
)
from search.trial.compress.qat import FakeQuant
from search.trial.compress.quantize import apply_precision_plan
from search.trial.compress.sparsity import Sparsifier

__all__ = [
    "FakeQuant",
    "Sparsifier",
    "apply_precision_plan",
    "compressible_layers",
    "count_zero_fraction",
    "distill",
    "drop_blocks",
    "export_onnx",
    "onnx_node_names",
    "prune_structured",
    "prune_unstructured",
    "teacher_outputs",
]
