"""int8 must really run as int8 kernels in ONNX Runtime's optimized graph."""

from collections import Counter

import onnx
import pytest
import torch

from search._base.ort import make_session
from search._base.records import Choices
from search.trial.compress import (
    apply_precision_plan,
    compressible_layers,
    export_onnx,
    onnx_node_names,
)
from search.trial.compress.quantize import output_tail
from search.trial.evaluate import onnx_accuracy
from tests.support.profiles import host_reduce_range


@pytest.fixture(scope="module")
def fp32(task):
    return export_onnx(task.teacher(), task.input_shape)


def _quantize(fp32, task, layers, plan, **kw):
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    choices = Choices(precisions=plan, calibration_samples=64, **kw)
    return apply_precision_plan(fp32, plan, names, choices, task.calibration,
                                reduce_range=host_reduce_range())


def _optimized_ops(model: bytes, tmp_path) -> tuple[Counter, onnx.ModelProto]:
    path = tmp_path / "optimized.onnx"
    make_session(model, threads=1, optimized_path=str(path))
    graph = onnx.load(str(path))
    return Counter(n.op_type for n in graph.graph.node), graph


def _fp32_convs_fed_by_dequantize(graph: onnx.ModelProto) -> int:
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    return sum(1 for n in graph.graph.node if n.op_type in ("Conv", "FusedConv")
               and producers.get(n.input[0]) == "DequantizeLinear")


def test_uniform_u8s8_runs_fused_int8_convs(fp32, task, layers, tmp_path):
    plan = {layer.name: "int8" for layer in layers}
    model = _quantize(fp32, task, layers, plan, activation_type="uint8")
    ops, graph = _optimized_ops(model, tmp_path)
    n_conv = sum(layer.op_type == "Conv" for layer in layers)
    assert ops["QLinearConv"] == n_conv, ops
    assert ops["Conv"] == 0 and ops["FusedConv"] == 0, ops
    assert _fp32_convs_fed_by_dequantize(graph) == 0
    assert onnx_accuracy(model, task.val) >= task.teacher_info["val_accuracy"] - 1.0


def test_fp32_layers_stay_fp32_in_a_mixed_plan(fp32, task, layers, tmp_path):
    plan = {layer.name: "int8" for layer in layers}
    plan["layer1.conv1"] = "fp32"
    model = _quantize(fp32, task, layers, plan, activation_type="uint8")
    ops, graph = _optimized_ops(model, tmp_path)
    n_conv = sum(layer.op_type == "Conv" for layer in layers)
    # ONNX Runtime must not quantize the fp32 layer's weights behind our back
    node = onnx_node_names(onnx.load_from_string(fp32), layers)["layer1.conv1"]
    kinds = {n.op_type for n in graph.graph.node if n.name.startswith(node)}
    assert kinds & {"Conv", "FusedConv"} and not kinds & {"QLinearConv"}, kinds
    # an fp32 island also unfuses its neighbour (DESIGN.md: islands cost more than they save)
    assert 0 < ops["QLinearConv"] < n_conv, ops


@pytest.mark.parametrize("symmetric", [False, True])
def test_fp32_islands_keep_accuracy(fp32, task, layers, symmetric):
    """Every single-layer fp32 island scores like the teacher (a fused ReLU must survive)."""
    for layer in layers:
        plan = {other.name: "int8" for other in layers}
        plan[layer.name] = "fp32"
        model = _quantize(fp32, task, layers, plan, activation_symmetric=symmetric)
        assert onnx_accuracy(model, task.val) >= task.teacher_info["val_accuracy"] - 1.0, layer


def test_fp16_and_int16_plans_score_like_the_teacher(fp32, task, layers):
    from search.latency import costs_from_onnx

    for plan_of in (lambda i: "fp16", lambda i: ("int8", "fp16")[i % 2],
                    lambda i: ("int8", "int16")[i % 2]):
        plan = {layer.name: plan_of(i) for i, layer in enumerate(layers)}
        act = "int16" if "int16" in plan.values() else "uint8"
        model = _quantize(fp32, task, layers, plan, activation_type=act)
        assert onnx_accuracy(model, task.val) >= task.teacher_info["val_accuracy"] - 1.0, plan
        names = onnx_node_names(onnx.load_from_string(fp32), layers)
        realized = {c.name: c.precision for c in costs_from_onnx(model)
                    if c.op_type in ("Conv", "Gemm")}
        assert realized == {names[layer.name]: plan[layer.name] for layer in layers}


def test_all_fp32_plan_returns_the_model_untouched(fp32, task, layers):
    plan = {layer.name: "fp32" for layer in layers}
    assert _quantize(fp32, task, layers, plan) == fp32


def test_unknown_precision_is_a_trial_error(fp32, task, layers):
    from search._base.errors import TrialError

    plan = {layer.name: "bf16" for layer in layers}  # no bf16 path: refused, not crashed
    with pytest.raises(TrialError, match="not implemented"):
        _quantize(fp32, task, layers, plan)


def test_dynamic_int8_runs_integer_kernels_without_calibration(fp32, task, layers):
    plan = {layer.name: "int8" for layer in layers}
    model = _quantize(fp32, task, layers, plan, quant_mode="dynamic")
    ops = Counter(n.op_type for n in onnx.load_from_string(model).graph.node)
    assert ops["ConvInteger"] == sum(layer.op_type == "Conv" for layer in layers)
    assert ops["MatMulInteger"] == 1  # the classifier, rewritten from Gemm
    assert ops["DynamicQuantizeLinear"] >= 1
    assert "QuantizeLinear" not in ops  # no static (calibrated) ranges
    assert onnx_accuracy(model, task.val) > 97


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_methods_set_other_activation_ranges(fp32, task, layers, method):
    from onnx import numpy_helper

    plan = {layer.name: "int8" for layer in layers}

    def scales(model):
        g = onnx.load_from_string(model).graph
        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        return {n.input[0]: float(inits[n.input[1]]) for n in g.node
                if n.op_type == "QuantizeLinear" and n.input[1] in inits
                and inits[n.input[1]].size == 1}

    minmax = scales(_quantize(fp32, task, layers, plan, calibration_method="minmax"))
    other_model = _quantize(fp32, task, layers, plan, calibration_method=method)
    other = scales(other_model)
    common = set(minmax) & set(other)
    assert common and any(abs(minmax[k] - other[k]) > 1e-6 * max(minmax[k], 1e-12)
                          for k in common)
    assert onnx_accuracy(other_model, task.val) > 95


def test_int4_weight_only_classifier_runs_as_matmulnbits(fp32, task, layers):
    plan = {layer.name: ("int4" if layer.op_type == "Gemm" else "int8") for layer in layers}
    model = _quantize(fp32, task, layers, plan, activation_type="uint8")
    graph = onnx.load_from_string(model).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulNBits"] == 1 and "Gemm" not in ops
    assert onnx_accuracy(model, task.val) > 97
    from search.latency import costs_from_onnx

    assert [c.precision for c in costs_from_onnx(model) if c.op_type == "MatMul"] == ["int4"]


def test_int4_on_a_conv_is_refused(fp32, task, layers):
    from search._base.errors import TrialError

    plan = {layer.name: "fp32" for layer in layers}
    plan[layers[0].name] = "int4"
    with pytest.raises(TrialError, match="int4 weight-only quantization only applies"):
        _quantize(fp32, task, layers, plan)


@pytest.mark.parametrize("per_channel", [True, False])
def test_per_channel_or_per_tensor_weight_scales(fp32, task, layers, per_channel):
    from onnx import numpy_helper

    plan = {layer.name: "int8" for layer in layers}
    model = _quantize(fp32, task, layers, plan, per_channel=per_channel)
    graph = onnx.load_from_string(model).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weight_scales = [inits[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear"
                     and n.input[0] in inits and inits[n.input[0]].ndim == 4]
    assert weight_scales
    assert all((s.size > 1) == per_channel for s in weight_scales)


def test_dynamic_int8_quantizes_layers_with_equal_weights():
    """The exporter stores equal weights once (the second behind an Identity); dynamic
    int8 needs every weight as an initializer (MobileNetV3: "Expected onnx::Conv_405 to be
    an initializer")."""
    import numpy as np
    import torch
    from torch import nn

    from search.trial.compress import compressible_layers

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()
    with torch.no_grad():
        model[2].weight.copy_(model[0].weight)
    fp32 = export_onnx(model, (4, 8, 8))
    layers = compressible_layers(model)
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    plan = {layer.name: "int8" for layer in layers}
    int8 = apply_precision_plan(fp32, plan, names, Choices(precisions=plan, quant_mode="dynamic"),
                                torch.randn(8, 4, 8, 8), reduce_range=host_reduce_range())
    ops = Counter(n.op_type for n in onnx.load_from_string(int8).graph.node)
    assert ops["ConvInteger"] == 2
    x = torch.randn(2, 4, 8, 8)
    out = make_session(int8, threads=1).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - model(x).detach().numpy()).max() < 0.1 * np.abs(out).max() + 1e-3


def test_a_swin_transformer_is_quantized_where_symbolic_shapes_give_up():
    """torchvision's Swin (shifted windows: reshapes ONNX Runtime's symbolic shape
    inference cannot follow) still gets int8: pre-processing falls back to ONNX's shapes."""
    from pathlib import Path

    import torch
    import torchvision.models as tvm

    from search.trial.compress import compressible_layers

    torch.manual_seed(0)
    model = tvm.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                num_heads=[2, 2], window_size=[2, 2], num_classes=10).eval()
    layers = compressible_layers(model, torch.zeros(1, 3, 16, 16))
    fp32 = export_onnx(model, (3, 16, 16))
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    plan = {layer.name: "int8" for layer in layers}
    int8 = apply_precision_plan(fp32, plan, names, Choices(precisions=plan, calibration_samples=8),
                                torch.randn(8, 3, 16, 16), reduce_range=False)
    nodes = onnx.load_from_string(int8).graph.node
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) >= len(layers)
    assert not list(Path.cwd().glob("sym_shape_infer_temp*"))  # ONNX Runtime's dump, removed


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_an_int8_lstm_runs_as_onnx_runtimes_dynamic_lstm_in_every_layer(mode):
    """A stacked ``nn.LSTM`` is one layer with one ONNX node per stacked layer: int8 turns
    each into a DynamicQuantizeLSTM (ONNX Runtime has no static QDQ LSTM), whatever mode the
    Linear layers around it are quantized in; fp32 leaves every one in float."""
    import numpy as np
    import torch

    from search.trial.compress import compressible_layers
    from tests.families import SeriesClassifier

    torch.manual_seed(0)
    model = SeriesClassifier().eval()
    x = torch.randn(64, 32, 3)
    layers = compressible_layers(model, x[:1])
    assert [(layer.name, layer.op_type) for layer in layers] == [
        ("proj", "Gemm"), ("rnn", "LSTM"), ("head", "Gemm")]
    fp32 = export_onnx(model, (32, 3))
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    expected = model(x[:8]).detach().numpy()
    for rnn, kernels in (("int8", {"DynamicQuantizeLSTM": 2}), ("fp32", {"LSTM": 2})):
        plan = {"proj": "int8", "rnn": rnn, "head": "int8"}
        out = apply_precision_plan(fp32, plan, names, Choices(precisions=plan, quant_mode=mode),
                                   x, reduce_range=host_reduce_range())
        ops = Counter(n.op_type for n in onnx.load_from_string(out).graph.node)
        assert {k: ops[k] for k in ("LSTM", "DynamicQuantizeLSTM") if ops[k]} == kernels
        session = make_session(out, threads=1)
        got = session.run(None, {session.get_inputs()[0].name: x[:8].numpy()})[0]
        assert np.abs(got - expected).max() < 0.05


class _TwoHeads(torch.nn.Module):
    """A shared conv, then a class head and a box head whose outputs, of ranges a hundred
    times apart, are concatenated into one output as a detector's are."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.cls = torch.nn.Conv2d(8, 2, 1)
        self.box = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return torch.cat([self.cls(h).flatten(2), 100 * self.box(h).flatten(2)], 1)


def test_what_follows_the_last_layers_stays_float_so_merged_outputs_keep_their_own_scales():
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    x = torch.randn(64, 1, 8, 8)
    fp32 = export_onnx(model, (1, 8, 8))
    proto = onnx.load_from_string(fp32)
    graph = proto.graph
    tail = output_tail(graph)
    assert {n.op_type for n in graph.node if n.name in tail} >= {"Concat"}
    assert not {n.name for n in graph.node if n.op_type == "Conv"} & tail
    plan = {"body": "int8", "cls": "int8", "box": "int8"}
    int8 = apply_precision_plan(fp32, plan, onnx_node_names(proto, compressible_layers(model, x[:1])),
                                Choices(precisions=plan, calibration_samples=64), x,
                                reduce_range=host_reduce_range())
    producers = {o: n.op_type for n in onnx.load_from_string(int8).graph.node for o in n.output}
    out = onnx.load_from_string(int8).graph.output[0].name
    assert producers[out] == "Concat"  # not a QuantizeLinear -> DequantizeLinear of the merge
    got = make_session(int8, threads=1).run(None, {"input": x.numpy()})[0]
    want = model(x).detach().numpy()
    cls_error = abs(got[:, :2] - want[:, :2]).max() / abs(want[:, :2]).max()
    assert cls_error < 0.05  # one scale for both would leave the class logits a step or two
