"""The latency model's predictions on real exported models: what each profile term does."""

from dataclasses import replace

import pytest
import torch

from search._base.errors import ConfigError
from search.latency.costing import LayerCost, costs_from_onnx
from search.latency.fit import fit_calibration
from search.latency.model import Calibration, predict_ms
from search.profiles import load_profile
from search.trial.compress import export_onnx
from search.trial.compress.prune import prune_unstructured
from search.trial.costs import costs_from_torch

PROFILES = ["t4-gpu", "a100-gpu", "vpu", "fpga", "npu", "cpu-avx512-vnni", "cpu-avx2"]


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


def test_profile_without_latency_model_cannot_predict(task):
    bare = load_profile("cpu-avx512-vnni").model_copy(update={"latency_model": None})
    with pytest.raises(ConfigError, match="latency_model"):
        predict_ms(costs_from_onnx(export_onnx(task.teacher(), task.input_shape)), bare)


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


def test_weights_beyond_the_cache_stream_at_the_dram_rate():
    """Every run reads all of a model's weights: where they outgrow the cache, they come from
    DRAM (a 67 MB fp32 Linear of VGG-11 ran at 16 GB/s on the 2-core Xeon, a 1 MB model's
    layers several times faster)."""
    from search.latency.costing import LayerCost

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


def test_runtime_nodes_cost_what_their_kernel_spends_per_element():
    """A ReLU streams its tensor; ONNX Runtime's int8 softmax spent ~3.3 ns an element on the
    2-core Xeon, 4x its fp32 one and 30x a ReLU (tools/node_costs.py): one overhead per
    node cannot say both, and a fit of one made every node of a small CNN dear to pay for a
    transformer's softmaxes."""
    from search.latency.costing import LayerCost

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
