"""Graph costing on real exported models: what each layer and runtime node is read as."""

from dataclasses import replace

import onnx
import pytest
import torch

from search._base.records import Choices
from search.latency.costing import costs_from_onnx
from search.latency.model import predict_ms
from search.profiles import load_profile
from search.trial.compress import apply_precision_plan, export_onnx, onnx_node_names
from search.trial.costs import costs_from_torch
from tests.support.latency import fp32_and_int8
from tests.support.profiles import host_reduce_range


def test_onnx_and_torch_layer_costs_agree(task):
    fp32 = costs_from_onnx(export_onnx(task.teacher(), task.input_shape))
    torch_costs = costs_from_torch(task.teacher(), task.input_shape, 1)
    assert sum(c.macs for c in fp32) == sum(c.macs for c in torch_costs)


def test_int8_precision_is_read_from_the_qdq_graph(task, layers):
    fp32 = export_onnx(task.teacher(), task.input_shape)
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    plan = {layer.name: "int8" for layer in layers}
    plan["fc"] = "fp32"
    q = apply_precision_plan(fp32, plan, names, Choices(precisions=plan), task.calibration,
                             reduce_range=host_reduce_range())
    realized = {c.name: c.precision for c in costs_from_onnx(q) if c.op_type in ("Conv", "Gemm")}
    assert realized[names["fc"]] == "fp32"
    assert {realized[names[x.name]] for x in layers if x.name != "fc"} == {"int8"}


def test_an_fp16_model_costs_the_work_of_its_layers_at_any_batch(task, layers):
    """fp16 conversion leaves the exporter's symbolic batch in the value infos; every
    layer behind one was once costed as empty (a uniform fp16 ResNet-18 predicted 70x faster
    than fp32 on an H100 at batch 128, where it measured 1.45x)."""
    fp32 = export_onnx(task.teacher(), task.input_shape)
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    plan = {layer.name: "fp16" for layer in layers}
    converted = apply_precision_plan(fp32, plan, names, Choices(precisions=plan),
                                     task.calibration, reduce_range=host_reduce_range())
    for batch in (1, 8):
        want = sum(c.macs for c in costs_from_onnx(fp32, batch))
        got = costs_from_onnx(converted, batch)
        assert sum(c.macs for c in got) == want > 0
        assert {c.precision for c in got if c.op_type in ("Conv", "Gemm")} == {"fp16"}
    profile = load_profile("t4-gpu")
    assert predict_ms(costs_from_onnx(converted, 8), profile) > 2 * predict_ms(
        costs_from_onnx(converted, 1), profile)  # eight images cost more than one


def test_attention_matmuls_of_two_activations_cost_compute():
    """Q·Kᵀ and weights·V have no weight initializer; their MACs are rows x the shared
    dimension x columns all the same, so a longer sequence must predict slower."""
    from search.trial.compress import export_onnx

    class Gram(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, tokens, dim)
            return (x @ x.transpose(-1, -2)).softmax(-1) @ x

    profile = load_profile("cpu-avx2")
    costs = {n: costs_from_onnx(export_onnx(Gram(), (n, 8))) for n in (16, 64)}
    matmuls = [c for c in costs[16] if c.op_type == "MatMul"]
    assert [c.activations_only for c in matmuls] == [True, True]
    assert [c.macs for c in matmuls] == [16 * 16 * 8, 16 * 16 * 8]
    assert predict_ms(costs[64], profile) > predict_ms(costs[16], profile)
    only_fp16 = load_profile("vpu")  # runs fp16 only: the activations' fp32 is not refused
    assert predict_ms(costs[16], only_fp16) > 0


def test_cpu_costs_come_from_the_graph_onnx_runtime_executes(task):
    """On a CPU-provider profile the non-compute costs are the nodes ONNX Runtime runs after
    its optimizer: a ResNet's quantize/dequantize pairs are fused into its int8 convolutions
    (none left but at the input and output), while an int8 ``nn.TransformerEncoder`` keeps
    standalone ones and more nodes than its fp32 form, so it is predicted slower than fp32,
    as it measures (0.50 against 0.29 ms on the AVX-512 VNNI host of the profile's fit)."""
    from search.latency.costing import costs_for
    from tests.families import EncoderClassifier

    profile = load_profile("cpu-avx512-vnni")
    _, resnet = fp32_and_int8(task.teacher(), task.input_shape)
    costs = costs_for(resnet, profile)
    assert all(c.runtime_node for c in costs if c.op_type not in ("Conv", "Gemm", "MatMul"))
    qdq = [c.op_type for c in costs if c.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) <= 2 and {"QLinearAdd"} <= {c.op_type for c in costs}

    torch.manual_seed(0)
    fp32, int8 = fp32_and_int8(EncoderClassifier(), (3, 32, 32))
    nodes = {name: [c for c in costs_for(m, profile) if c.runtime_node]
             for name, m in (("fp32", fp32), ("int8", int8))}
    assert len(nodes["int8"]) > len(nodes["fp32"])
    assert sum(c.op_type == "DequantizeLinear" for c in nodes["int8"]) > 2
    assert predict_ms(costs_for(int8, profile), profile) > predict_ms(costs_for(fp32, profile),
                                                                      profile)
    # the exported graph alone counts its quantize/dequantize nodes as free
    exported = costs_from_onnx(int8)
    assert not any(c.runtime_node for c in exported)
    # a GPU profile's runtime is not ONNX Runtime's CPU provider: the exported graph
    assert not any(c.runtime_node for c in costs_for(int8, load_profile("t4-gpu")))


def test_a_graph_onnx_runtime_cannot_open_is_costed_as_exported(caplog):
    """An operator ONNX Runtime lacks (a custom domain): the prediction still comes, from the
    exported graph, and says why."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["s"]),
                               helper.make_node("Unknown", ["s"], ["y"], domain="com.example")],
                              "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    with caplog.at_level("WARNING"):
        costs = costs_from_onnx(model.SerializeToString(), runtime_graph=True)
    assert [c.op_type for c in costs] == ["Softmax", "Unknown"]
    assert not any(c.runtime_node for c in costs)
    assert "costing the exported graph instead" in caplog.text


def _conv_on(side: int) -> bytes:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3, padding=1)).eval()
    return export_onnx(model, (256, side, side))


def test_convolution_taps_on_padding_are_skipped_only_where_the_kernels_skip_them():
    """A 3x3 convolution over a 1x1 map reads the input with its centre tap alone; ONNX
    Runtime's fp32 CPU kernels skip the other eight (ResNet-18's last stage at 32 px ran 9.4 MB
    of fp32 weights in 61 us), its int8 im2col kernels and a GPU's do not."""
    from search.latency.costing import _padding_shares  # noqa: PLC2701
    from search.latency.graph import Graph

    tiny = [c for c in costs_from_onnx(_conv_on(1)) if c.op_type == "Conv"][0]
    assert (tiny.on_input, tiny.taps_used) == pytest.approx((1 / 9, 1 / 9))
    small = [c for c in costs_from_onnx(_conv_on(2)) if c.op_type == "Conv"][0]
    assert (small.on_input, small.taps_used) == pytest.approx((4 / 9, 1.0))
    big = [c for c in costs_from_onnx(_conv_on(32)) if c.op_type == "Conv"][0]
    assert big.on_input > 0.85 and big.taps_used == 1.0
    assert _padding_shares(onnx.helper.make_node("Conv", ["x", "w"], ["y"]), None, (3, 3)) \
        == (1.0, 1.0)  # shapes unknown: every tap counted
    assert Graph  # the class the shares are read with

    cpu, gpu = load_profile("cpu-avx512-vnni"), load_profile("t4-gpu")
    assert "fp32" in cpu.latency_model.skips_padding and not gpu.latency_model.skips_padding
    full = replace(tiny, on_input=1.0, taps_used=1.0)
    base = predict_ms([], cpu)  # the run's own overhead
    assert predict_ms([tiny], cpu) - base < 0.5 * (predict_ms([full], cpu) - base)
    assert predict_ms([tiny], gpu) == pytest.approx(predict_ms([full], gpu))
    int8 = replace(tiny, precision="int8")
    assert predict_ms([int8], cpu) == pytest.approx(predict_ms([replace(full, precision="int8")],
                                                                cpu))


def test_a_weight_dequantized_on_every_run_is_costed_as_fp32_work_and_a_pass():
    """An int8 Linear before an fp32 one: ONNX Runtime fuses neither the second's input nor its
    weight's DequantizeLinear into an integer kernel, so it turns 16.7 M int8 weights into
    fp32 on every run and multiplies in fp32 (VGG-11 at 32 px: 13.3 ms against 3.5 ms for
    uniform int8, the pass alone 6.2 ms); both are in the prediction."""
    from search.trial.compress import compressible_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10)).eval()
    shape = (1, 8, 8)
    layers = compressible_layers(model)
    fp32 = export_onnx(model, shape)
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    plans = {"int8": {x.name: "int8" for x in layers}}
    plans["mixed"] = {**plans["int8"], layers[-1].name: "fp32"}
    costs = {k: costs_from_onnx(apply_precision_plan(fp32, plan, names, Choices(precisions=plan),
                                                     torch.randn(16, *shape),
                                                     reduce_range=host_reduce_range()),
                                runtime_graph=True) for k, plan in plans.items()}
    compute = {k: {c.name: c.precision for c in v if not c.runtime_node} for k, v in costs.items()}
    assert set(compute["int8"].values()) == {"int8"}
    assert compute["mixed"] == {"/1/Gemm": "int8", "/3/Gemm": "fp32", "/5/Gemm": "fp32"}
    passes = [c for c in costs["mixed"] if c.op_type == "DequantizeLinear"
              and c.moved_bytes >= 512 * 512 * 5]  # int8 read, fp32 written
    assert len(passes) == 1
    profile = load_profile("cpu-avx512-vnni")
    assert predict_ms(costs["mixed"], profile) > 1.5 * predict_ms(costs["int8"], profile)


def test_an_lstm_costs_its_steps_and_reads_its_recurrent_weights_at_each():
    """Per step and sample an LSTM multiplies W (4H x I) and R (4H x H) once, and at batch 1
    reads R again at every step; int8 (DynamicQuantizeLSTM) is costed in int8."""
    from search.trial.compress import compressible_layers
    from tests.families import SeriesClassifier

    torch.manual_seed(0)
    model = SeriesClassifier().eval()
    layers = compressible_layers(model)
    fp32 = export_onnx(model, (32, 3))
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    plan = {layer.name: "int8" for layer in layers}
    int8 = apply_precision_plan(fp32, plan, names, Choices(precisions=plan),
                                torch.randn(16, 32, 3), reduce_range=host_reduce_range())
    for graph, precision in ((fp32, "fp32"), (int8, "int8")):
        costs = [c for c in costs_from_onnx(graph, runtime_graph=True) if c.op_type == "LSTM"]
        assert [c.precision for c in costs] == [precision] * 2
        first, second = costs  # inputs 32 then 64 wide, hidden 64
        assert first.macs == 32 * 4 * 64 * (32 + 64) and second.macs == 32 * 4 * 64 * (64 + 64)
        size = 4 if precision == "fp32" else 1
        assert second.moved_bytes >= 32 * 4 * 64 * 64 * size  # R read at each of 32 steps
    profile = load_profile("cpu-avx512-vnni")
    assert predict_ms(costs_from_onnx(int8, runtime_graph=True), profile) < predict_ms(
        costs_from_onnx(fp32, runtime_graph=True), profile)


def test_a_transformer_exported_with_computed_shapes_costs_its_matmuls():
    """``nn.MultiheadAttention`` exports its head split as a Reshape to a shape computed by
    Shape/Gather/Concat nodes: without propagating those values, every tensor behind it had
    no shape and an fp32 encoder's MatMuls were costed at 0 MACs (predicted a third too fast
    on the 2-core Xeon, whatever its width)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2).eval()
    costs = costs_from_onnx(export_onnx(model, (16, 64)))
    matmuls = [c for c in costs if c.op_type == "MatMul"]
    feed_forward = [c for c in matmuls if c.weight_elems == 64 * 128]
    assert len(feed_forward) == 4 and all(c.macs == 16 * 64 * 128 for c in feed_forward)
    attention = [c for c in matmuls if c.activations_only]
    assert attention and all(c.macs > 0 for c in attention)


def test_shapes_read_off_a_run_scale_with_the_batch():
    """A GPU profile costs at its batch (8 to 128): the run that tells the shapes behind a
    computed reshape is made at batch 1 and its activations scaled, so the MACs grow with the
    batch like everything else (and a large model is never run at batch 128 on the CPU)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = export_onnx(torch.nn.TransformerEncoder(layer, 1).eval(), (16, 64))

    def attention_macs(batch: int) -> int:
        return sum(c.macs for c in costs_from_onnx(model, batch) if c.activations_only)

    assert attention_macs(1) > 0 and attention_macs(8) == 8 * attention_macs(1)


def test_a_gru_costs_three_gates_and_unrolled_its_matmuls():
    """A native GRU node is costed as an LSTM is, with three gates: per step and sample W
    (3H x I) and R (3H x H), R read again at each step. Planned int8 it is exported unrolled,
    and its MatMuls are costed in int8, one for the inputs and one per later step."""
    from search.trial.compress import compressible_layers
    from tests.support.recurrent_families import GRUClassifier

    torch.manual_seed(0)
    model = GRUClassifier(layers=2, hidden=32).eval()
    layers = compressible_layers(model)
    fp32 = export_onnx(model, (16, 3))
    costs = [c for c in costs_from_onnx(fp32, runtime_graph=True) if c.op_type == "GRU"]
    first, second = costs  # inputs 3 then 32 wide, hidden 32
    assert first.macs == 16 * 3 * 32 * (3 + 32) and second.macs == 16 * 3 * 32 * (32 + 32)
    assert second.moved_bytes >= 16 * 3 * 32 * 32 * 4 and first.precision == "fp32"
    plan = {layer.name: "int8" for layer in layers}
    flat = export_onnx(model, (16, 3), precisions=plan)
    int8 = apply_precision_plan(flat, plan, onnx_node_names(onnx.load_from_string(flat), layers),
                                Choices(precisions=plan, quant_mode="dynamic"),
                                torch.randn(8, 16, 3), reduce_range=host_reduce_range())
    matmuls = [c for c in costs_from_onnx(int8) if c.op_type == "MatMul" and "/rnn/" in c.name]
    assert len(matmuls) == 2 * 16 and {c.precision for c in matmuls} == {"int8"}
    assert sum(c.macs for c in matmuls) == sum(c.macs for c in costs) - 2 * 3 * 32 * 32
