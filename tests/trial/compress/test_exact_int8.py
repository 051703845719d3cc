"""An int8 model is scored as an int8 device computes it, even on a CPU whose kernels saturate."""

import numpy as np
import onnx
import onnx.version_converter
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from search._base.ort import make_session
from search._base.records import Choices
from search.trial.compress import apply_precision_plan, compressible_layers, export_onnx, onnx_node_names
from search.trial.compress.exact_int8 import exact_int8_twin, int8_saturates_here


def _saturating_int8(activation_type: str = "uint8") -> tuple[bytes, np.ndarray]:
    """A convolution whose int8 products, added in pairs, overflow 16 bits: large positive
    weights on inputs near the top of their range."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3, padding=1)).eval()
    with torch.no_grad():  # (two layers: the tensor between them has a declared int8 type)
        model[0].weight.uniform_(0.5, 1.0)
        model[2].weight.uniform_(0.5, 1.0)
    x = torch.rand(8, 1, 8, 8) * 0.2 + 0.8
    fp32 = export_onnx(model, (1, 8, 8))
    names = onnx_node_names(onnx.load_from_string(fp32), compressible_layers(model, x[:1]))
    plan = {"0": "int8", "2": "int8"}
    choices = Choices(precisions=plan, calibration_samples=8, activation_type=activation_type,
                      activation_symmetric=activation_type == "int8")
    int8 = apply_precision_plan(fp32, plan, names, choices, x, reduce_range=False)
    # with every tensor's type declared, as a shape-inferred model (t4-gpu's) has them
    return onnx.shape_inference.infer_shapes(onnx.load_from_string(int8)).SerializeToString(), \
        x.numpy()


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    return make_session(model, threads=1).run(None, {"input": x})[0]


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_the_twin_computes_what_the_quantized_graph_means(activations):
    int8, x = _saturating_int8(activations)
    # onnx's reference evaluator: the graph's meaning in plain numpy, no integer kernels
    meaning = onnx.version_converter.convert_version(onnx.load_from_string(int8), 21)
    exact = ReferenceEvaluator(meaning).run(None, {"input": x})[0]
    twin = exact_int8_twin(int8)
    kinds = {t.data_type for t in onnx.load_from_string(twin).graph.initializer}
    assert onnx.TensorProto.INT8 not in kinds and onnx.TensorProto.UINT8 in kinds
    step = np.abs(exact).max() / 127
    assert np.abs(_run(twin, x) - exact).max() <= step  # at most one rounding step apart
    if int8_saturates_here():  # what scoring the shipped model here would have given
        assert np.abs(_run(int8, x) - exact).max() > 4 * step


def test_a_model_without_int8_values_is_left_as_it_is():
    fp32 = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)).eval(), (1, 8, 8))
    assert exact_int8_twin(fp32) == fp32
