"""The latency model's basic sanity, on real exported models."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from search._base.errors import ConfigError
from search._base.records import Choices
from search.latency.predict import (
    Calibration,
    LayerCost,
    costs_from_onnx,
    costs_from_torch,
    fit_calibration,
    predict_ms,
)
from search.profiles import load_profile
from search.trial.compress import apply_precision_plan, export_onnx, onnx_node_names, prune_structured
from search.trial.compress.prune import prune_unstructured
from tests.conftest import host_reduce_range

PROFILES = ["t4-gpu", "a100-gpu", "vpu", "fpga", "npu", "cpu-avx512-vnni", "cpu-avx2"]


def _pruned(task, ratio):
    model = task.teacher()
    prune_structured(model, torch.zeros(1, *task.input_shape), ratio, round_to=8)
    return export_onnx(model, task.input_shape)


@pytest.fixture(scope="module")
def pruned_models(task):
    return {ratio: _pruned(task, ratio) for ratio in (0.0, 0.25, 0.5)}


@pytest.mark.parametrize("name", PROFILES)
def test_removing_channels_never_predicts_slower(name, pruned_models):
    profile = load_profile(name)
    p = profile.precisions_used()[0]
    times = []
    for ratio in (0.0, 0.25, 0.5):
        costs = [c if c.op_type not in ("Conv", "Gemm") else
                 type(c)(**{**c.__dict__, "precision": p}) for c in costs_from_onnx(pruned_models[ratio])]
        times.append(predict_ms(costs, profile))
    assert times[0] > times[1] > times[2], times


def test_unstructured_zeros_pay_only_with_sparse_kernels(task):
    model = task.teacher()
    prune_unstructured(model, 0.7)
    sparse = costs_from_onnx(export_onnx(model, task.input_shape))
    dense = costs_from_onnx(export_onnx(task.teacher(), task.input_shape))
    assert min(c.density for c in sparse if c.op_type == "Conv") < 0.5
    none = load_profile("cpu-avx512-vnni")
    assert none.sparse_kernels == "none"
    assert predict_ms(sparse, none) == pytest.approx(predict_ms(dense, none))
    with_kernels = none.model_copy(update={"sparse_kernels": "unstructured"})
    assert predict_ms(sparse, with_kernels) < predict_ms(dense, with_kernels)


def test_lower_precision_predicts_faster_on_a_gpu(task):
    profile = load_profile("t4-gpu")
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(128, 128, 3, padding=1))
    times = {p: predict_ms(costs_from_torch(model, (64, 56, 56), 8, p), profile)
             for p in ("fp32", "fp16", "int8")}
    assert times["fp32"] > times["fp16"] > times["int8"], times


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


def test_profile_without_latency_model_cannot_predict(task):
    bare = load_profile("cpu-avx512-vnni").model_copy(update={"latency_model": None})
    with pytest.raises(ConfigError, match="latency_model"):
        predict_ms(costs_from_onnx(export_onnx(task.teacher(), task.input_shape)), bare)


def test_calibration_refit_recovers_known_factors(pruned_models):
    """Measurements generated from known factors: the fit must find them again."""
    profile = load_profile("cpu-avx512-vnni")
    truth = Calibration({"fp32": 0.2, "int8": 0.05}, op_overhead_us=9.0, session_overhead_us=40.0)
    samples = []
    for model in pruned_models.values():
        for p in ("fp32", "int8"):
            costs = [type(c)(**{**c.__dict__, "precision": p}) for c in costs_from_onnx(model)]
            samples.append((costs, predict_ms(costs, profile, truth)))
    fitted = fit_calibration(samples, profile, prior=0.0)
    errors = [abs(predict_ms(c, profile, fitted) / ms - 1) for c, ms in samples]
    assert np.max(errors) < 0.02
    assert fitted.fitted_on == len(samples)
    # pulled towards the profile's numbers (the default), six measurements still move the
    # fit most of the way from them, but not all the way
    pulled = fit_calibration(samples, profile)
    profile_errors = [abs(predict_ms(c, profile) / ms - 1) for c, ms in samples]
    pulled_errors = [abs(predict_ms(c, profile, pulled) / ms - 1) for c, ms in samples]
    assert 0.02 < np.max(pulled_errors) < 0.25 * np.max(profile_errors)


def test_tensor_core_fill_makes_int8_pay_more_at_batch_8_than_at_batch_1():
    """With ``fill_rows`` (tensor-core tiles) a layer with few output rows runs below its
    efficiency, so int8's gain over fp32 grows with the batch, as NVIDIA's T4 table shows
    (ResNet-50: 3.5x at batch 1, 7.3x at batch 8); without it the gain cannot depend on the
    batch beyond overheads."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
    costs = {b: costs_from_torch(model, (3, 224, 224), b, device="meta") for b in (1, 8)}
    t4 = load_profile("t4-gpu")
    assert t4.latency_model.fill_rows["int8"] > 0

    def gain(profile, batch: int) -> float:
        as_ = {p: [type(c)(**{**c.__dict__, "precision": p}) for c in costs[batch]]
               for p in ("fp32", "int8")}
        return predict_ms(as_["fp32"], profile) / predict_ms(as_["int8"], profile)

    assert gain(t4, 8) > 1.5 * gain(t4, 1)
    flat = t4.model_copy(update={"latency_model": t4.latency_model.model_copy(
        update={"fill_rows": {}, "op_overhead_us": 0.0, "session_overhead_us": 0.0})})
    assert gain(flat, 8) == pytest.approx(gain(flat, 1), rel=0.02)


def test_negative_fill_rows_are_refused():
    from pydantic import ValidationError

    from search.profiles import LatencyModelSettings

    with pytest.raises(ValidationError, match="fill_rows"):
        LatencyModelSettings(peak_tops={"int8": 1.0}, memory_gbps=1.0, fill_rows={"int8": -1})


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


def _int8(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """The model exported in fp32 and with every Conv/Linear in int8 (QDQ), as a trial does."""
    from search.trial.compress import compressible_layers
    from search.trial.compress.heads import prune_heads

    model.eval()
    prune_heads(model, 0.0, always=True)  # attention as its own MatMuls, as a trial has it
    layers = compressible_layers(model)
    fp32 = export_onnx(model, shape)
    names = onnx_node_names(onnx.load_from_string(fp32), layers)
    plan = {layer.name: "int8" for layer in layers}
    return fp32, apply_precision_plan(fp32, plan, names, Choices(precisions=plan),
                                      torch.randn(16, *shape), reduce_range=host_reduce_range())


def test_cpu_costs_come_from_the_graph_onnx_runtime_executes(task):
    """On a CPU-provider profile the non-compute costs are the nodes ONNX Runtime runs after
    its optimizer: a ResNet's quantize/dequantize pairs are fused into its int8 convolutions
    (none left but at the input and output), while an int8 ``nn.TransformerEncoder`` keeps
    standalone ones and more nodes than its fp32 form, so it is predicted slower than fp32,
    as it measures (0.50 against 0.29 ms on the AVX-512 VNNI host of the profile's fit)."""
    from search.latency.predict import costs_for
    from tests.families import EncoderClassifier

    profile = load_profile("cpu-avx512-vnni")
    _, resnet = _int8(task.teacher(), task.input_shape)
    costs = costs_for(resnet, profile)
    assert all(c.runtime_node for c in costs if c.op_type not in ("Conv", "Gemm", "MatMul"))
    qdq = [c.op_type for c in costs if c.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) <= 2 and {"QLinearAdd"} <= {c.op_type for c in costs}

    torch.manual_seed(0)
    fp32, int8 = _int8(EncoderClassifier(), (3, 32, 32))
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


def test_a_refit_on_executed_graphs_fits_the_node_overhead(task):
    """Latencies made from a known node overhead: the fit finds it (it is what an
    int8 transformer's standalone quantize nodes cost), and the fit of exported-graph
    samples leaves it unset."""
    from search.latency.predict import costs_for
    from tests.families import EncoderClassifier

    profile = load_profile("cpu-avx512-vnni")
    # without the cache term: its DRAM rate is one more unknown than six models pin down
    profile = profile.model_copy(update={"latency_model": profile.latency_model.model_copy(
        update={"cache_mb": None, "dram_gbps": None})})
    truth = Calibration({"fp32": 0.5, "int8": 0.3}, op_overhead_us=2.0, session_overhead_us=30.0,
                        node_overhead_us=6.0)
    models = [m for m in _int8(task.teacher(), task.input_shape)]
    torch.manual_seed(0)
    models += list(_int8(EncoderClassifier(), (3, 32, 32)))
    for ratio in (0.25, 0.5):  # as many models as the fit has unknowns, and a few more
        model = task.teacher()
        prune_structured(model, torch.zeros(1, *task.input_shape), ratio, round_to=8)
        models += list(_int8(model, task.input_shape))
    samples = [(costs_for(m, profile), 0.0) for m in models]
    samples = [(c, predict_ms(c, profile, truth)) for c, _ in samples]
    fitted = fit_calibration(samples, profile, prior=0.0)  # what the data alone say
    assert fitted.node_overhead_us == pytest.approx(6.0, rel=0.15)
    assert max(abs(predict_ms(c, profile, fitted) / ms - 1) for c, ms in samples) < 0.03
    plain = fit_calibration([(costs_from_onnx(m), ms) for m, (_, ms) in zip(models, samples,
                                                                             strict=True)],
                            profile)
    assert plain.node_overhead_us == profile.latency_model.node_overhead_us


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


def test_memory_efficiency_is_refit_per_precision():
    """ONNX Runtime's int8 kernels stream a weight-bound layer's weights (few output pixels,
    or a Linear at batch 1) at about half the fp32 rate on the 2-core Xeon, while compute-bound
    layers run int8 ~3x faster: one memory efficiency shared by every precision cannot fit
    both, and held-out int8 CNNs were then predicted slower than their fp32 forms."""
    from search.latency.predict import LayerCost

    profile = load_profile("cpu-avx512-vnni")
    truth = Calibration({"fp32": 0.7, "int8": 0.5}, op_overhead_us=2.0, session_overhead_us=40.0,
                        memory_efficiency={"fp32": 2.0, "int8": 0.4})
    samples = []
    for width in (64, 128, 256, 512):
        weight_bound = [LayerCost(f"fc{i}", "Gemm", "fp32", macs=width * width,
                                  weight_elems=width * width, in_elems=width, out_elems=width)
                        for i in range(4)]
        compute_bound = [LayerCost(f"conv{i}", "Conv", "fp32", macs=width * 9 * 64 * 256,
                                   weight_elems=width * 9 * 64, in_elems=64 * 256,
                                   out_elems=width * 256) for i in range(4)]
        for layers in (weight_bound, compute_bound, weight_bound + compute_bound):
            for p in ("fp32", "int8"):
                costs = [type(c)(**{**c.__dict__, "precision": p}) for c in layers]
                samples.append((costs, predict_ms(costs, profile, truth)))
    fitted = fit_calibration(samples, profile, prior=0.0)
    errors = [abs(predict_ms(c, profile, fitted) / ms - 1) for c, ms in samples]
    assert np.max(errors) < 0.03
    assert fitted.memory_efficiency["int8"] < 0.5 * fitted.memory_efficiency["fp32"]


def _conv_on(side: int) -> bytes:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3, padding=1)).eval()
    return export_onnx(model, (256, side, side))


def test_convolution_taps_on_padding_are_skipped_only_where_the_kernels_skip_them():
    """A 3x3 convolution over a 1x1 map reads the input with its centre tap alone; ONNX
    Runtime's fp32 CPU kernels skip the other eight (ResNet-18's last stage at 32 px ran 9.4 MB
    of fp32 weights in 61 us), its int8 im2col kernels and a GPU's do not."""
    from search.latency.predict import _Graph, _padding_shares  # noqa: PLC2701

    tiny = [c for c in costs_from_onnx(_conv_on(1)) if c.op_type == "Conv"][0]
    assert (tiny.on_input, tiny.taps_used) == pytest.approx((1 / 9, 1 / 9))
    small = [c for c in costs_from_onnx(_conv_on(2)) if c.op_type == "Conv"][0]
    assert (small.on_input, small.taps_used) == pytest.approx((4 / 9, 1.0))
    big = [c for c in costs_from_onnx(_conv_on(32)) if c.op_type == "Conv"][0]
    assert big.on_input > 0.85 and big.taps_used == 1.0
    assert _padding_shares(onnx.helper.make_node("Conv", ["x", "w"], ["y"]), None, (3, 3)) \
        == (1.0, 1.0)  # shapes unknown: every tap counted
    assert _Graph  # the class the shares are read with

    cpu, gpu = load_profile("cpu-avx512-vnni"), load_profile("t4-gpu")
    assert "fp32" in cpu.latency_model.skips_padding and not gpu.latency_model.skips_padding
    full = replace(tiny, on_input=1.0, taps_used=1.0)
    base = predict_ms([], cpu)  # the run's own overhead
    assert predict_ms([tiny], cpu) - base < 0.5 * (predict_ms([full], cpu) - base)
    assert predict_ms([tiny], gpu) == pytest.approx(predict_ms([full], gpu))
    int8 = replace(tiny, precision="int8")
    assert predict_ms([int8], cpu) == pytest.approx(predict_ms([replace(full, precision="int8")],
                                                                cpu))


def test_weights_beyond_the_cache_stream_at_the_dram_rate():
    """Every run reads all of a model's weights: where they outgrow the cache, they come from
    DRAM (a 67 MB fp32 Linear of VGG-11 ran at 16 GB/s on the 2-core Xeon, a 1 MB model's
    layers several times faster)."""
    from search.latency.predict import LayerCost

    profile = load_profile("cpu-avx512-vnni")
    settings = profile.latency_model
    cal = Calibration.of(settings)
    assert cal.bandwidth_gbps(settings, 0.0) == settings.memory_gbps
    rates = [cal.bandwidth_gbps(settings, mb) for mb in (0.1, 1, 10, 100, 1000)]
    assert rates == sorted(rates, reverse=True) and rates[-1] < 1.1 * settings.dram_gbps

    def linear(n: int) -> LayerCost:  # batch 1: memory-bound
        return LayerCost("fc", "Gemm", "fp32", macs=n * n, weight_elems=n * n, in_elems=n,
                         out_elems=n)

    per_byte = [(predict_ms([linear(n)], profile) - predict_ms([], profile)) / (4 * n * n)
                for n in (256, 4096)]
    assert per_byte[1] > 2 * per_byte[0]
    no_cache = profile.model_copy(update={"latency_model": settings.model_copy(
        update={"cache_mb": None, "dram_gbps": None})})
    assert predict_ms([linear(4096)], no_cache) < predict_ms([linear(4096)], profile)
    with pytest.raises(ValueError, match="cache_mb and dram_gbps go together"):
        settings.model_validate({**settings.model_dump(), "dram_gbps": None})


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


def test_runtime_nodes_cost_what_their_kernel_spends_per_element():
    """A ReLU streams its tensor; ONNX Runtime's int8 softmax spent ~3.3 ns an element on the
    2-core Xeon, 4x its fp32 one and 30x a ReLU (tools/node_costs.py): one overhead per
    node cannot say both, and a fit of one made every node of a small CNN dear to pay for a
    transformer's softmaxes."""
    from search.latency.predict import LayerCost

    profile = load_profile("cpu-avx512-vnni")
    rates = profile.latency_model.node_ns_per_element
    assert rates["QLinearSoftmax"] > 3 * rates["Softmax"] > 3 * rates["Relu"]

    def node(op: str, elems: int) -> LayerCost:
        return LayerCost(name=op, op_type=op, precision="int8", in_elems=elems, out_elems=elems,
                         runtime_node=True, moved_bytes=2.0 * elems)

    base = predict_ms([], profile)
    small, big = (predict_ms([node("QLinearSoftmax", n)], profile) - base for n in (1024, 65536))
    assert big - small == pytest.approx(64512 * rates["QLinearSoftmax"] * 1e-6, rel=1e-6)
    relu = predict_ms([node("Relu", 65536)], profile) - base
    # a transpose of uint8 data moves a quarter of the bytes the table's fp32 one did
    moved = {p: predict_ms([replace(node("Transpose", 65536), precision=p)], profile) - base
             for p in ("int8", "fp32")}
    assert moved["int8"] < 0.5 * moved["fp32"]
    unknown = predict_ms([node("SomeNewOp", 65536)], profile) - base
    assert relu < unknown < big  # an op type not in the table: the default rate
    # a fit scales the table as a whole, and keeps it without such a table (GPU profiles)
    samples = [([node("QLinearSoftmax", n), node("Relu", n)],
                predict_ms([node("QLinearSoftmax", n), node("Relu", n)], profile,
                           replace(Calibration.of(profile.latency_model), node_scale=2.0)))
               for n in (1024, 8192, 65536, 262144)]
    assert fit_calibration(samples, profile, prior=0.0).node_scale == pytest.approx(2.0, rel=0.05)
    assert Calibration.of(load_profile("t4-gpu").latency_model).node_scale is None


def test_depthwise_and_few_channel_int8_convolutions_cost_what_their_kernels_do():
    """ONNX Runtime's int8 depthwise kernel ran 3-4x slower than its fp32 one (16 channels at
    32x32: 17.3 against 4.9 us a layer), and its int8 3x3 convolutions copy their input into
    columns first (16 channels at 32x32: 23.5 us, 10 us from the MACs alone): a model of
    depthwise layers is not 4x faster in int8, and a thin int8 network pays per pixel."""
    torch.manual_seed(0)
    depthwise = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1,
                                                                groups=16)).eval(), (16, 32, 32))
    dense = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1)).eval(),
                        (16, 32, 32))
    pointwise = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 1)).eval(), (16, 32, 32))
    (dw,) = [c for c in costs_from_onnx(depthwise) if c.op_type == "Conv"]
    (d3,) = [c for c in costs_from_onnx(dense) if c.op_type == "Conv"]
    (d1,) = [c for c in costs_from_onnx(pointwise) if c.op_type == "Conv"]
    assert dw.depthwise and not d3.depthwise and dw.im2col_copies == 0 == d1.im2col_copies
    assert d3.im2col_copies == 32 * 32 * 9

    cpu, gpu = load_profile("cpu-avx512-vnni"), load_profile("t4-gpu")
    base = predict_ms([], cpu)

    def ms(cost, precision, profile=cpu):  # noqa: ANN001, ANN202
        return predict_ms([replace(cost, precision=precision)], profile) - \
            predict_ms([], profile)

    assert ms(dw, "int8") > 2 * ms(dw, "fp32")  # slower in int8 on this CPU
    assert ms(replace(dw, depthwise=False), "int8") < ms(dw, "fp32")  # as a dense conv it was not
    im2col = d3.im2col_copies * cpu.latency_model.im2col_ns_per_copy["int8"] * 1e-6
    assert ms(d3, "int8") == pytest.approx(ms(replace(d3, im2col_copies=0), "int8") + im2col)
    assert ms(d3, "fp32") == pytest.approx(ms(replace(d3, im2col_copies=0), "fp32"))  # direct
    assert ms(dw, "int8", gpu) < ms(dw, "fp32", gpu)  # a profile without the terms: unchanged
    assert base > 0


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


def test_fp32_convolutions_cost_their_channels_padded_to_the_kernels_blocks():
    """ONNX Runtime's fp32 NCHWc kernels pad channels to blocks of 16 with AVX-512: 48->40,
    40->48 and 48->48 channel 3x3 convolutions all ran 48.4-48.8 us at 16x16 (1 thread), and
    a first layer with fewer input channels than a block reads them unpadded (1 channel in:
    11 us, 16 in: 47 us). So pruning 48 channels to 40 buys nothing in fp32, while int8
    kernels, which do not block channels, gain what the MACs say."""
    torch.manual_seed(0)

    def conv(cin: int, cout: int, side: int = 16) -> LayerCost:
        model = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, padding=1)).eval(),
                            (cin, side, side))
        (cost,) = [c for c in costs_from_onnx(model) if c.op_type == "Conv"]
        return cost

    c48, c40, c40_in, stem = conv(48, 48), conv(48, 40), conv(40, 48), conv(1, 40, 32)
    assert (c40.in_channels, c40.out_channels) == (48, 40)
    cpu = load_profile("cpu-avx512-vnni")
    assert cpu.latency_model.channel_block == {"fp32": 16}

    def ms(cost: LayerCost, precision: str) -> float:
        return predict_ms([replace(cost, precision=precision)], cpu) - predict_ms([], cpu)

    assert ms(c40, "fp32") == pytest.approx(ms(c48, "fp32"), rel=0.01)
    assert ms(c40_in, "fp32") == pytest.approx(ms(c48, "fp32"), rel=0.01)
    assert ms(c40, "int8") < 0.9 * ms(c48, "int8")
    # the first layer's single input channel is not padded; its 40 outputs are, to 48
    unpadded = replace(stem, out_channels=0)  # 0: a cost that says nothing of its channels
    assert ms(stem, "fp32") / ms(unpadded, "fp32") == pytest.approx(48 / 40, rel=0.05)
    # blocking kernels take 2-D convolutions, dense or depthwise: a grouped one or a 1-D one
    # is costed unpadded
    grouped = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(40, 40, 3, groups=2)).eval(),
                          (40, 16, 16))
    temporal = export_onnx(torch.nn.Sequential(torch.nn.Conv1d(40, 40, 3)).eval(), (40, 64))
    for model in (grouped, temporal):
        (cost,) = [c for c in costs_from_onnx(model) if c.op_type == "Conv"]
        assert (cost.in_channels, cost.out_channels) == (0, 0)


def test_a_device_faster_than_its_profiles_nominal_peak_is_fitted(pruned_models):
    """A profile's peaks are nominal for a class of device (``cpu-avx512-vnni`` spans
    Cascade Lake to Zen 5, whose cores ran the digits ResNet's fp32 model 2x faster than a
    Xeon's): a machine may run its kernels above the nominal peak, and a fit must be able to
    say so instead of stopping at efficiency 1 and blaming the overheads."""
    profile = load_profile("cpu-avx512-vnni")
    truth = Calibration({"fp32": 1.6, "int8": 1.3}, op_overhead_us=1.0, session_overhead_us=2.0)
    samples = []
    for model in pruned_models.values():
        for p in ("fp32", "int8"):
            costs = [replace(c, precision=p) for c in costs_from_onnx(model)]
            samples.append((costs, predict_ms(costs, profile, truth)))
    fitted = fit_calibration(samples, profile, prior=0.0)
    errors = [abs(predict_ms(c, profile, fitted) / ms - 1) for c, ms in samples]
    assert np.max(errors) < 0.02
    assert fitted.efficiency["fp32"] > 1.0
