"""Recurrent layers: hidden-width pruning of nn.GRU / nn.LSTM / nn.RNN (stacked and
bidirectional, with what reads them), and the int8 GRU exported unrolled into MatMuls."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from search._base.errors import TrialError
from search._base.ort import make_session
from search._base.records import Choices
from search.trial.compress import (
    apply_precision_plan,
    compressible_layers,
    export_onnx,
    onnx_node_names,
    prune_structured,
)
from search.trial.compress.recurrent import (
    hidden_units,
    prune_recurrent,
    readers,
    recurrent_ratios,
    recurrent_widths,
)
from search.trial.compress.unrolled import UnrolledGRU, unrolled
from tests.support.recurrent_families import BiLSTMClassifier, GRUClassifier

STEPS = 12


class _RNNClassifier(nn.Module):
    """A projection, a 2-layer ``nn.RNN`` (ReLU), a Linear on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 16)
        self.rnn = nn.RNN(16, 48, num_layers=2, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.proj(x))
        return self.head(out[:, -1])


class _Chained(nn.Module):
    """Two separate GRUs, the second reading the first (sequence-major), a head on ``h_n``."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.GRU(3, 32)
        self.second = nn.GRU(32, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.first(x.transpose(0, 1))
        _, h = self.second(out)
        return self.head(h[-1])


class _Normed(nn.Module):
    """A GRU whose output goes through a LayerNorm before the head: no safe reader."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 32, num_layers=2, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(self.norm(out[:, -1]))


class _Decoder(nn.Module):
    """An encoder GRU whose final state starts a decoder GRU: their widths are tied."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.GRU(3, 32, batch_first=True)
        self.decoder = nn.GRU(3, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.encoder(x)
        out, _ = self.decoder(x, h)
        return self.head(out[:, -1])


class _Embedding(nn.Module):
    """A GRU whose last output is the model's output beside the head's (an embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]), out[:, -1]


MODELS = {
    "gru-1layer": lambda: GRUClassifier(layers=1, hidden=40),
    "gru-2layer": lambda: GRUClassifier(layers=2, hidden=64),
    "bilstm-2layer": lambda: BiLSTMClassifier(hidden=32),
    "rnn-2layer": _RNNClassifier,
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _expected_params(rnn: nn.RNNBase, hidden: int) -> int:
    """An ``rnn`` of width ``hidden``: gates x hidden x (input + hidden + 2 biases) per
    stacked layer and direction."""
    gates = {"GRU": 3, "LSTM": 4}.get(rnn.mode, 1)
    dirs = 2 if rnn.bidirectional else 1
    total = 0
    for layer in range(rnn.num_layers):
        inputs = rnn.weight_ih_l0.shape[1] if layer == 0 else dirs * hidden
        total += dirs * gates * hidden * (inputs + hidden + 2)
    return total


@pytest.mark.parametrize("name", list(MODELS))
def test_hidden_units_go_from_every_gate_layer_direction_and_reader(name):
    """At ratio 0.5 a recurrent layer keeps half its hidden width, rounded down to the
    channel multiple, in every stacked layer and direction; the head reading it loses the
    matching input columns; it stays a real nn.GRU/LSTM/RNN and the model still runs."""
    model = _model(name)
    before, full = model.rnn.hidden_size, _params(model)
    x = torch.randn(4, STEPS, 3)
    prune_structured(model, x[:1], 0.5, round_to=8)
    rnn = model.rnn
    assert type(rnn) is type(MODELS[name]().rnn)
    assert rnn.hidden_size == recurrent_widths(before, 0.5, 8) == (before // 2) // 8 * 8
    dirs = 2 if rnn.bidirectional else 1
    assert model.head.in_features == dirs * rnn.hidden_size
    assert _params(rnn) == _expected_params(rnn, rnn.hidden_size)
    assert _params(model) < 0.5 * full
    assert model(x).shape == (4, model.head.out_features)


def test_widths_round_to_the_channel_multiple_and_never_below_one():
    assert recurrent_widths(128, 0.3, 8) == 88  # 89.6 units left, rounded down
    assert recurrent_widths(128, 0.99, 8) == 8
    assert recurrent_widths(100, 0.0, 8) == 100  # nothing removed: the width as it was
    assert recurrent_widths(12, 0.5, 16) == 12


@pytest.mark.parametrize("name", list(MODELS))
def test_ratio_zero_changes_nothing(name):
    model = _model(name)
    before = [p.clone() for p in model.parameters()]
    prune_structured(model, torch.zeros(1, STEPS, 3), 0.0, round_to=8)
    assert prune_recurrent(model, torch.zeros(1, STEPS, 3), {"rnn": 0.0}, 8) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _silence(rnn: nn.RNNBase, units: dict[tuple[int, int], torch.Tensor]) -> None:
    """Zero every weight and bias of the units not in ``units``: their state stays 0."""
    gates = {"GRU": 3, "LSTM": 4}.get(rnn.mode, 1)
    size = rnn.hidden_size
    with torch.no_grad():
        for (layer, d), kept in units.items():
            gone = torch.ones(size, dtype=torch.bool)
            gone[kept] = False
            rows = torch.cat([gone] * gates)
            suffix = f"l{layer}{'_reverse' if d else ''}"
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(rnn, f"{name}_{suffix}")[rows] = 0
            getattr(rnn, f"weight_hh_{suffix}")[:, gone] = 0


@pytest.mark.parametrize("name", [*MODELS, "chained"])
def test_the_pruned_model_computes_what_the_model_with_those_units_silenced_does(name):
    """Removing units whose weights are zero changes no output: the rows, columns, the next
    layer's inputs (both directions) and the readers' columns removed are the right ones."""
    torch.manual_seed(0)
    model = _Chained().eval() if name == "chained" else _model(name)
    x = torch.randn(6, STEPS, 3)
    rnns = {n: m for n, m in model.named_modules() if isinstance(m, nn.RNNBase)}
    for rnn in rnns.values():
        _silence(rnn, hidden_units(rnn, recurrent_widths(rnn.hidden_size, 0.5, 8)))
    with torch.no_grad():
        expected = model(x)
    widths = prune_recurrent(model, x[:1], dict.fromkeys(rnns, 0.5), round_to=8)
    assert set(widths) == set(rnns)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_a_reader_after_a_transformation_is_not_safe_and_the_width_stays():
    """The head reads the GRU through a LayerNorm (its weights have the GRU's width): no
    reader is known safely, so the GRU keeps its width and the model still runs."""
    torch.manual_seed(0)
    model = _Normed().eval()
    x = torch.randn(2, STEPS, 3)
    assert readers(model, "rnn", x[:1]) is None
    prune_structured(model, x[:1], 0.5, round_to=8)
    assert model.rnn.hidden_size == 32 and model(x).shape == (2, 4)


@pytest.mark.parametrize(("build", "name"), [(_Normed, "rnn"), (_Decoder, "encoder"),
                                           (_Decoder, "decoder"), (_Embedding, "rnn")])
def test_a_width_other_code_relies_on_is_not_safe(build, name):
    """A LayerNorm between the GRU and its head, a decoder started from the encoder's state
    (neither can be thinned alone), the GRU's output returned by the model: not safe, so
    the width is kept."""
    torch.manual_seed(0)
    model = build().eval()
    assert readers(model, name, torch.zeros(1, STEPS, 3)) is None
    assert prune_recurrent(model, torch.zeros(1, STEPS, 3), {name: 0.5}, 8) == {}
    prune_structured(model, torch.zeros(1, STEPS, 3), 0.5, round_to=8)  # runs, as it was
    assert model.get_submodule(name).hidden_size == 32


def test_readers_name_the_unit_of_each_column():
    """The head of a bidirectional LSTM on ``h_n[-2:]`` reads the last layer's forward
    then backward units; the second of two chained GRUs reads the first's output."""
    model = _model("bilstm-2layer")
    found = readers(model, "rnn", torch.zeros(1, STEPS, 3))
    assert [r.name for r in found] == ["head"]
    assert found[0].columns == [(1, d, u) for d in (0, 1) for u in range(32)]
    chained = _Chained().eval()
    assert [r.name for r in readers(chained, "first", torch.zeros(1, STEPS, 3))] == ["second"]


def test_a_segment_ratio_is_that_of_the_first_layer_to_run_after():
    model = _model("rnn-2layer")
    segments = {"early": ["proj"], "middle": [], "late": ["head"]}
    x = torch.zeros(1, STEPS, 3)
    assert recurrent_ratios(model, x, {"early": 0.25, "late": 0.5}, segments) == {"rnn": 0.5}
    assert recurrent_ratios(model, x, {"early": 0.25}, segments) == {"rnn": 0.0}
    assert recurrent_ratios(model, x, 0.3, {}) == {"rnn": 0.3}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_pruned_model_exports_and_onnx_runtime_agrees(name):
    model = _model(name)
    x = torch.randn(5, STEPS, 3)
    prune_structured(model, x[:1], 0.5, round_to=8)
    session = make_session(export_onnx(model, (STEPS, 3)), threads=1)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [dict(num_layers=1), dict(num_layers=2),
                                     dict(num_layers=2, bidirectional=True),
                                     dict(num_layers=1, batch_first=False, bias=False)])
def test_the_unrolled_gru_is_the_gru(options):
    torch.manual_seed(0)
    batch_first = options.pop("batch_first", True)
    gru = nn.GRU(5, 16, batch_first=batch_first, **options).eval()
    x = torch.randn(3, 9, 5) if batch_first else torch.randn(9, 3, 5)
    h0 = torch.randn(gru.num_layers * (2 if gru.bidirectional else 1), 3, 16)
    with torch.no_grad():
        for state in (None, h0):
            expected, got = gru(x, state), UnrolledGRU(gru)(x, state)
            for a, b in zip(expected, got, strict=True):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_the_gru_is_put_back_after_an_unrolled_export():
    model = _model("gru-2layer")
    gru = model.rnn
    with unrolled(model, ["rnn"]):
        assert isinstance(model.rnn, UnrolledGRU)
    assert model.rnn is gru


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_an_int8_gru_runs_unrolled_with_integer_matmuls(mode):
    """A GRU planned int8 exports as MatMuls whose every one is quantized (MatMulInteger, or
    static QDQ), its gates in fp32; it runs in ONNX Runtime close to the fp32 model. Planned
    fp32, the same layer is one native GRU node per stacked layer."""
    model = _model("gru-2layer")
    x = torch.randn(32, STEPS, 3)
    layers = compressible_layers(model, x[:1])
    assert [(layer.name, layer.op_type) for layer in layers] == [("rnn", "GRU"), ("head", "Gemm")]
    with torch.no_grad():
        expected = model(x[:8]).numpy()
    native = export_onnx(model, (STEPS, 3))
    assert Counter(n.op_type for n in onnx.load_from_string(native).graph.node)["GRU"] == 2
    assert onnx_node_names(onnx.load_from_string(native), layers)["rnn"] == "/rnn/GRU"
    plan = {"rnn": "int8", "head": "fp32"}
    flat = export_onnx(model, (STEPS, 3), precisions=plan)
    names = onnx_node_names(onnx.load_from_string(flat), layers)
    assert names["rnn"] == "/rnn/MatMul"
    out = apply_precision_plan(flat, plan, names, Choices(precisions=plan, quant_mode=mode,
                                                          calibration_samples=32),
                               x, reduce_range=False)
    graph = onnx.load_from_string(out).graph
    ops = Counter(n.op_type for n in graph.node)
    matmuls = 2 + 2 * (STEPS - 1)  # the inputs once per layer, the state at each later step
    produced = {o: n.op_type for n in graph.node for o in n.output}
    float_matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.name.startswith("/rnn/")]
    if mode == "dynamic":
        assert ops["MatMulInteger"] == matmuls and not float_matmuls
    else:  # QDQ: both inputs of each MatMul dequantized from int8, which ONNX Runtime fuses
        assert len(float_matmuls) == matmuls and all(
            produced.get(i) == "DequantizeLinear" for n in float_matmuls for i in n.input)
        assert ops["Clip"] == 0 and ops["Sigmoid"] == 2 * STEPS  # the gates stay fp32
    assert ops["GRU"] == 0
    session = make_session(out, threads=1)
    got = session.run(None, {"input": x[:8].numpy()})[0]
    assert np.abs(got - expected).max() < 0.05


def test_a_gru_node_planned_int8_is_refused():
    """Exported without the plan, the GRU is a native node, which runs in float only."""
    model = _model("gru-1layer")
    layers = compressible_layers(model)
    native = export_onnx(model, (STEPS, 3))
    names = onnx_node_names(onnx.load_from_string(native), layers)
    plan = {"rnn": "int8", "head": "fp32"}
    with pytest.raises(TrialError, match="exported as GRU nodes"):
        apply_precision_plan(native, plan, names, Choices(precisions=plan, quant_mode="dynamic"),
                             torch.randn(8, STEPS, 3), reduce_range=False)
