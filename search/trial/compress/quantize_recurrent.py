"""Recurrent layers in a precision plan: LSTM and GRU.

ONNX Runtime has one int8 recurrent kernel, DynamicQuantizeLSTM (a CPU kernel,
no static QDQ form), and none for GRU. An LSTM planned int8 becomes that node;
a GRU planned int8 is exported unrolled into MatMuls
(:mod:`search.trial.compress.unrolled`) whose MatMuls are quantized as any
MatMul layer is, dynamic or static, while its gates and state update stay fp32.
"""

from __future__ import annotations

import onnx

from search._base.errors import TrialError

__all__ = ["bypass_qdq", "lstm_layers", "no_int8_gru_node", "unrolled_plan"]


def unrolled_plan(model: bytes, precisions: dict[str, str], node_names: dict[str, str],
                  ) -> tuple[dict[str, str], dict[str, str], frozenset[str]]:
    """The plan with each unrolled GRU's nodes as layers of their own, and the nodes that
    must read plain fp32 inputs: its MatMuls in its precision (int8: quantized as any MatMul
    layer, dynamic or static), every other node (biases, gates, state update) in fp32 with
    fp32 inputs, so the recurrence is not quantized at each step, as in DynamicQuantizeLSTM."""
    from search.trial.compress.export import unrolled_layers

    if all(p == "fp32" for p in precisions.values()):  # then nothing was unrolled
        return precisions, node_names, frozenset()
    proto = onnx.load_from_string(model)
    unrolled = unrolled_layers(proto, {layer: node_names[layer] for layer in precisions
                                       if layer in node_names})
    if not unrolled:
        return precisions, node_names, frozenset()
    bad = {layer: precisions[layer] for layer in unrolled
           if precisions[layer] not in ("fp32", "int8")}
    if bad:
        raise TrialError("quantize", f"GRU layers run in fp32 or int8 only, got {bad}")
    ops = {n.name: n.op_type for n in proto.graph.node}
    precisions, node_names, gates = dict(precisions), dict(node_names), set()
    for layer, nodes in unrolled.items():
        for node in nodes:
            matmul = ops[node] == "MatMul"
            if not matmul and precisions[layer] != "fp32":
                gates.add(node)
            if node != node_names[layer]:
                precisions[f"{layer}/{node}"] = precisions[layer] if matmul else "fp32"
                node_names[f"{layer}/{node}"] = node
    return precisions, node_names, frozenset(gates)


def no_int8_gru_node(model: bytes, precisions: dict[str, str],
                     node_names: dict[str, str]) -> None:
    """Refuse a GRU node planned in anything but fp32: ONNX Runtime runs GRU nodes in float
    only; a GRU planned int8 is exported unrolled (``export_onnx(..., precisions=plan)``)."""
    if b"GRU" not in model or all(p == "fp32" for p in precisions.values()):
        return
    gru = {n.name for n in onnx.load_from_string(model).graph.node if n.op_type == "GRU"}
    bad = sorted(layer for layer, p in precisions.items()
                 if p != "fp32" and node_names.get(layer) in gru)
    if bad:
        raise TrialError("quantize", f"GRU layers {bad} are planned in {precisions[bad[0]]} but "
                                     "were exported as GRU nodes, which run in float only: "
                                     "export them unrolled (export_onnx(..., precisions=plan))")


def bypass_qdq(model: onnx.ModelProto, nodes: frozenset[str]) -> None:
    """Feed the named nodes the fp32 tensors that static QDQ quantized on their way in (an
    activation's QuantizeLinear -> DequantizeLinear pair), then drop the pairs nothing reads.

    An unrolled GRU's hidden state feeds both the next step's int8 MatMul and the fp32 gate
    arithmetic; the gates should read it unrounded, with no Clip node per input (there are
    a dozen gate nodes per step).
    """
    if not nodes:
        return
    inits = {t.name for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.name not in nodes:
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" \
                else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
                node.input[i] = q.input[0]
    _drop_unread(model, ("QuantizeLinear", "DequantizeLinear"))


def _drop_unread(model: onnx.ModelProto, op_types: tuple[str, ...]) -> None:
    """Remove nodes of ``op_types`` whose outputs nothing reads, until none is left, and the
    initializers (scales, zero points) only they read."""
    outputs = {o.name for o in model.graph.output}
    freed: set[str] = set()
    while True:
        read = {i for node in model.graph.node for i in node.input} | outputs
        dead = [n for n in model.graph.node
                if n.op_type in op_types and not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            freed |= set(node.input)
            model.graph.node.remove(node)
    unread = freed - read
    for tensor in [t for t in model.graph.initializer if t.name in unread]:
        model.graph.initializer.remove(tensor)


def lstm_layers(model: bytes, precisions: dict[str, str],
                node_names: dict[str, str]) -> dict[str, list[str]]:
    """The LSTM layers of the plan, each with its nodes (one per stacked layer)."""
    from search.trial.compress.export import _layer_nodes

    if not precisions or b"LSTM" not in model:  # no LSTM op: no need to parse the model
        return {}
    proto = onnx.load_from_string(model)
    lstm = {n.name for n in proto.graph.node if n.op_type == "LSTM"}
    return {layer: _layer_nodes(proto, node_names[layer]) for layer in precisions
            if node_names.get(layer) in lstm}
