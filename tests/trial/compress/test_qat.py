"""Quantization-aware training: fake-quant during the fine-tune, exported as valid QDQ."""

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from search._base.records import Choices
from search.trial.compress import FakeQuant, apply_precision_plan, export_onnx, onnx_node_names
from search.trial.compress.distill import distill
from search.trial.compress.qat import _fake_weight
from search.trial.evaluate import onnx_accuracy
from tests.support.profiles import host_reduce_range


def test_fake_weight_is_on_the_int8_grid_with_a_straight_through_gradient():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    q = _fake_weight(w, per_channel=True)
    scale = w.detach().abs().flatten(1).amax(1).reshape(-1, 1, 1, 1) / 127
    assert torch.allclose(q / scale, torch.round(q / scale), atol=1e-4)
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_qat_trains_bakes_grid_weights_and_exports_valid_qdq(task, layers):
    student = task.teacher()
    names_int8 = [layer.name for layer in layers]
    fake = FakeQuant(student, names_int8, per_channel=True, activation_symmetric=False)
    assert student.stem[0].parametrizations.weight  # fake-quantized while training
    distill(student, task.teacher(), task.train, epochs=1, lr=1e-3, temperature=4.0, alpha=0.5,
            seed=0, hooks=[fake])
    fake.finish()
    assert not hasattr(student.stem[0], "parametrizations")  # plain module again
    w = student.layer2.conv1.weight.detach()
    scale = w.abs().flatten(1).amax(1).reshape(-1, 1, 1, 1) / 127
    assert torch.allclose(w / scale, torch.round(w / scale), atol=1e-3)
    fp32 = export_onnx(student, task.input_shape)
    plan = {layer.name: "int8" for layer in layers}
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    model = apply_precision_plan(fp32, plan, names, Choices(precisions=plan, qat=True),
                                 task.calibration, reduce_range=host_reduce_range())
    graph = onnx.load_from_string(model)
    onnx.checker.check_model(graph)
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [numpy_helper.to_array(t) for t in graph.graph.initializer
                    if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == sum(layer.op_type == "Conv" for layer in layers)
    top = {int(np.abs(q).max()) for q in int8_weights}
    assert top <= {63, 64} if host_reduce_range() else top == {127}  # 7-bit weights without VNNI
    assert onnx_accuracy(model, task.val) > 97
