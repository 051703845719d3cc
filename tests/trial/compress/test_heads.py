"""Attention heads are really removed from a small transformer, and it still runs in ORT."""

import numpy as np
import onnx
import onnxruntime as ort
import torch

from search.trial.compress import compressible_layers, export_onnx, onnx_node_names
from search.trial.compress.blocks import droppable_blocks
from search.trial.compress.heads import PrunedAttention, prune_heads
from search.trial.compress.prune import attention_modules, prune_structured
from tests.support.models import TinyViT


def test_replacing_attention_keeps_the_function():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(3, 1, 32, 32)
    before = model(x)
    prune_heads(model, 0.0, always=True)
    assert all(isinstance(m, PrunedAttention) for m in attention_modules(model))
    assert torch.allclose(model(x), before, atol=1e-5)


def test_half_the_heads_are_removed_with_their_projections():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(3, 1, 32, 32)
    params = sum(p.numel() for p in model.parameters())
    prune_structured(model, x[:1], 0.0, 8, head_ratio=0.5)
    attention = attention_modules(model)
    assert [m.num_heads for m in attention] == [2, 2]
    assert all(m.q_proj.weight.shape == (16, 32) and m.out_proj.weight.shape == (32, 16)
               for m in attention)
    assert sum(p.numel() for p in model.parameters()) < params
    assert droppable_blocks(model, x[:1]) == ["blocks.0", "blocks.1"]
    # the exported graph has the narrower projections, maps every layer, and agrees in ORT
    exported = export_onnx(model, (1, 32, 32))
    proto = onnx.load_from_string(exported)
    names = onnx_node_names(proto, compressible_layers(model))
    assert "blocks.0.self_attn.q_proj" in names
    widths = {tuple(t.dims) for t in proto.graph.initializer}
    assert (32, 16) in widths and (16, 32) in widths  # q/k/v: 32 -> 16, out: 16 -> 32
    session = ort.InferenceSession(exported, providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-4)


def test_the_most_important_heads_stay():
    torch.manual_seed(0)
    model = TinyViT().eval()
    mha = model.blocks[0].self_attn
    with torch.no_grad():  # make head 2 of the first layer clearly the largest
        mha.in_proj_weight.view(3, 4, 8, 32)[:, 2] *= 10
    prune_heads(model, 0.75)
    kept = model.blocks[0].self_attn
    assert kept.num_heads == 1
    big = mha.in_proj_weight.view(3, 4, 8, 32)[0, 2].reshape(8, 32)
    assert torch.allclose(kept.q_proj.weight, big)
