"""The compression stages of a trial: prune, distil, export, quantize."""

from search.compress.distill import distill
from search.compress.export import compressible_layers, export_onnx, onnx_node_names
from search.compress.prune import count_zero_fraction, prune_structured, prune_unstructured
from search.compress.quantize import apply_precision_plan

__all__ = [
    "apply_precision_plan",
    "compressible_layers",
    "count_zero_fraction",
    "distill",
    "export_onnx",
    "onnx_node_names",
    "prune_structured",
    "prune_unstructured",
]
