import pytest
import torch
from torch import nn

from search.trial.compress import count_zero_fraction, prune_structured, prune_unstructured
from search.trial.compress.prune import recalibrate_batchnorm


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_structured_pruning_removes_channels_rounded(task):
    model = task.teacher()
    before = {n: m.out_channels for n, m in _convs(model).items()}
    example = torch.zeros(1, *task.input_shape)
    prune_structured(model, example, 0.5, round_to=8)
    after = {n: m.out_channels for n, m in _convs(model).items()}
    assert sum(after.values()) < 0.7 * sum(before.values())
    assert all(c % 8 == 0 for c in after.values()), after
    assert model.fc.out_features == 10  # the classifier keeps its outputs
    assert model(example).shape == (1, 10)  # still a working network


def test_zero_ratio_changes_nothing(task):
    model = task.teacher()
    before = [p.clone() for p in model.parameters()]
    prune_structured(model, torch.zeros(1, *task.input_shape), 0.0, round_to=8)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_unstructured_pruning_reaches_requested_sparsity(task):
    model = task.teacher()
    assert count_zero_fraction(model) < 0.01
    prune_unstructured(model, 0.6)
    assert abs(count_zero_fraction(model) - 0.6) < 0.01
    assert not any(hasattr(m, "weight_mask") for m in model.modules())


def test_batchnorm_recalibration_rescues_one_shot_pruning(task):
    model = task.teacher()
    prune_structured(model, torch.zeros(1, *task.input_shape), 0.15, round_to=8)

    def accuracy():
        with torch.no_grad():
            return float((model(task.val.x).argmax(1) == task.val.y).float().mean()) * 100

    before = accuracy()
    recalibrate_batchnorm(model, task.train.x[:512])
    assert not model.training
    assert accuracy() > before + 20  # measured: 39% -> 93% at ratio 0.15


def test_layer_dropping_removes_the_least_changing_block(task):
    from search.trial.compress.blocks import drop_blocks, droppable_blocks

    model = task.teacher()
    example = task.train.x[:1]
    assert droppable_blocks(model, example) == ["layer1"]  # the only shape-keeping block
    before = sum(p.numel() for p in model.parameters())
    dropped = drop_blocks(model, 1, task.train.x[:64])
    assert dropped == ["layer1"] and isinstance(model.layer1, torch.nn.Identity)
    assert sum(p.numel() for p in model.parameters()) < before
    assert model(example).shape == (1, 10)


@pytest.mark.parametrize("importance", ["bn_scale", "taylor", "lamp"])
def test_each_importance_removes_channels_and_picks_its_own(task, importance):
    import torch_pruning as tp

    by_l2, other = task.teacher(), task.teacher()
    example = torch.zeros(1, *task.input_shape)
    prune_structured(by_l2, example, 0.5, 8)
    prune_structured(other, example, 0.5, 8, importance=importance, data=task.train)
    macs_l2, _ = tp.utils.count_ops_and_params(by_l2, example)
    macs, _ = tp.utils.count_ops_and_params(other, example)
    assert macs < 0.5 * 48.9e6
    assert other.stem[0].out_channels % 8 == 0
    # same widths, but not the same channels kept: the criterion matters
    full = task.teacher().stem[0].weight.detach()
    def kept(model):
        w = model.stem[0].weight.detach()
        return {int(torch.cdist(row.flatten()[None], full.flatten(1)).argmin()) for row in w}
    if importance != "lamp":  # LAMP ranks like L2 within a layer; it differs across layers
        assert kept(by_l2) != kept(other)


def _macs_params(model, example):
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return macs, params


@pytest.mark.parametrize("family", ["mlp", "transformer-encoder"])
def test_structured_pruning_thins_hidden_and_feed_forward_linears(family):
    from tests.families import CLASSES, FAMILIES

    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    example = torch.randn(1, *shape)
    macs, params = _macs_params(model, example)
    prune_structured(model, example, 0.5, round_to=8)
    macs_after, params_after = _macs_params(model, example)
    assert macs_after < 0.6 * macs and params_after < 0.6 * params
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == CLASSES  # the classifier keeps its outputs
    if family == "transformer-encoder":
        ff = model.encoder.layers[0].linear1
        assert ff.out_features == 32 and model.encoder.layers[0].linear2.in_features == 32
    else:
        assert [m.out_features for m in linears] == [64, 32, CLASSES]
    assert model(example).shape == (1, CLASSES)


def test_layer_dropping_keeps_the_transformer_encoder_calling_convention():
    from search.trial.compress.blocks import DroppedBlock, drop_blocks, droppable_blocks
    from search.trial.compress.heads import prune_heads
    from tests.families import EncoderClassifier

    torch.manual_seed(0)
    model = EncoderClassifier(layers=3).eval()
    x = torch.randn(8, 3, 32, 32)
    # the encoder reads its first layer's attention settings on every call: that one stays
    assert droppable_blocks(model, x[:1]) == ["encoder.layers.1", "encoder.layers.2"]
    dropped = drop_blocks(model, 2, x)
    assert sorted(dropped) == ["encoder.layers.1", "encoder.layers.2"]
    assert all(isinstance(model.encoder.layers[i], DroppedBlock) for i in (1, 2))
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[:, -3:] = True
    with torch.no_grad():  # eval, no grad, a padding mask: the encoder's nested-tensor fast path
        out = model.encoder(torch.randn(8, 16, 32), src_key_padding_mask=mask)
    assert out.shape == (8, 16, 32) and torch.isfinite(out[:, :-3]).all()
    assert prune_heads(model, 0.5) == {"encoder.layers.0.self_attn": 2}
    prune_structured(model, x[:1], 0.5, round_to=8)
    assert model(x).shape == (8, 10)


def test_a_ratio_per_depth_segment_thins_only_that_segment():
    """torchvision's ResNet-18 as users build it: three segments of about a third of the
    compute each, in the order the layers run; pruning the late one leaves the early widths."""
    import torchvision

    from search.trial.compress.prune import depth_segments

    model = torchvision.models.resnet18(num_classes=10).eval()
    example = torch.zeros(1, 3, 32, 32)
    segments = depth_segments(model, example)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert list(segments) == ["early", "middle", "late"]
    assert sum(segments.values(), []) == [n for n in layers if n in sum(segments.values(), [])]
    assert set(sum(segments.values(), [])) == set(layers)
    assert segments["early"][0] == "conv1" and segments["late"][-1] == "fc"
    before = {n: m.out_channels for n, m in _convs(model).items()}
    prune_structured(model, example, {"late": 0.5}, round_to=8, segments=segments)
    after = {n: m.out_channels for n, m in _convs(model).items()}
    assert all(after[n] == before[n] for n in segments["early"] if n in after)
    late = [n for n in segments["late"] if n in after]
    assert sum(after[n] for n in late) <= 0.6 * sum(before[n] for n in late)
    assert model(example).shape == (1, 10)
    with pytest.raises(ValueError, match="unknown depth segments.*early, middle, late"):
        prune_structured(model, example, {"head": 0.5}, round_to=8)


def test_segments_split_the_compute_in_thirds_whatever_the_layer_count():
    from search.trial.compress.prune import depth_segments

    equal = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)])
    assert depth_segments(equal, torch.zeros(1, 16)) == {
        "early": ["0", "1"], "middle": ["2", "3"], "late": ["4", "5"]}
    # the first layer holds 64 x 64 of 64 x 64 + 4 x 64 x 4 MACs: nearly all the compute
    heavy_first = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4), nn.Linear(4, 4),
                                nn.Linear(4, 4), nn.Linear(4, 4))
    segments = depth_segments(heavy_first, torch.zeros(1, 64))
    assert segments["early"] == ["0"] and segments["middle"] == []
    assert segments["late"] == ["1", "2", "3", "4"]


def test_taylor_gradients_taken_in_chunks_equal_one_batch(task):
    """Chunks bound the memory of the taylor importance's backward pass, not its result."""
    import torch.nn.functional as F

    from search.trial.compress.prune import _taylor_gradients

    chunked, whole = task.teacher(), task.teacher()
    _taylor_gradients(chunked, task.train)
    idx = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))[:128]
    F.cross_entropy(whole(task.train.x[idx]), task.train.y[idx]).backward()
    for a, b in zip(chunked.parameters(), whole.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


# layer dropping by structure: residual units found whatever their classes are called


def _dropped_still_runs_and_exports(model, x, names):
    """Drop ``names``; the model still runs, and its ONNX export agrees with it in ORT."""
    import onnxruntime as ort

    from search.trial.compress import export_onnx
    from search.trial.compress.blocks import remove_blocks

    remove_blocks(model, names)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    exported = export_onnx(model, tuple(x.shape[1:]))
    session = ort.InferenceSession(exported, providers=["CPUExecutionProvider"])
    assert abs(session.run(None, {"input": x.numpy()})[0] - expected).max() < 1e-4
    return exported


def test_a_custom_named_conv1d_resnet_offers_exactly_its_shape_keeping_blocks():
    from search.trial.compress.blocks import DroppedBlock, droppable_blocks, rank_blocks
    from tests.families import ResNet1d

    torch.manual_seed(0)
    model = ResNet1d().eval()
    x = torch.randn(4, 4, 64)
    # each stage's first Block1d downsamples: the other three keep their input's shape
    assert droppable_blocks(model, x[:1]) == ["layer1.1", "layer2.1", "layer3.1"]
    assert sorted(rank_blocks(model, x)) == ["layer1.1", "layer2.1", "layer3.1"]
    before = sum(p.numel() for p in model.parameters())
    _dropped_still_runs_and_exports(model, x, ["layer2.1", "layer3.1"])
    assert isinstance(model.layer2[1], DroppedBlock) and isinstance(model.layer3[1], DroppedBlock)
    assert sum(p.numel() for p in model.parameters()) < before
    assert droppable_blocks(model, x[:1]) == ["layer1.1"]  # what a drop leaves is no block


class ResUnit(nn.Module):
    """A residual wrapper around whatever body it is given (an ``nn.Sequential``)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return nn.functional.relu(x + self.body(x))


class ConvBlock(nn.Sequential):
    """conv + bn + relu of equal widths: keeps its input's shape, named ``*Block``, and is
    no residual."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                         nn.ReLU())


def _sequential_body(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                         nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))


def test_a_residual_wrapper_is_a_block_and_a_plain_shape_keeping_stack_is_not():
    from search.trial.compress.blocks import droppable_blocks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                          ResUnit(_sequential_body(8)),  # residual under an odd name
                          nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                        nn.ReLU()),  # shape-keeping, not residual
                          ConvBlock(8),  # named like a block, not residual
                          ResUnit(nn.Sequential(ResUnit(_sequential_body(8)), nn.ReLU())),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    # the outermost residual of the nested ones, never the unit inside it
    assert droppable_blocks(model, x[:1]) == ["1", "4"]
    _dropped_still_runs_and_exports(model, x, ["1", "4"])


class InlineCNN(nn.Module):
    """Residuals written inline: a branch added back onto its input, a branch fed through a
    norm, and a projection added onto something it was not computed from (no residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = _sequential_body(8)
        self.norm = nn.BatchNorm2d(8)
        self.mlp = nn.Sequential(nn.Conv2d(8, 16, 1), nn.GELU(), nn.Conv2d(16, 8, 1))
        self.side = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.branch(y)
        y = y + 0.5 * self.mlp(self.norm(y))
        y = y + self.side(x)  # computed from the input, not from y: dropping it is no identity
        return self.head(y.mean((2, 3)))


def test_an_inline_residual_branch_is_dropped_with_its_compute():
    import onnx

    from search.trial.compress.blocks import (
        DroppedBlock,
        DroppedBranch,
        drop_blocks,
        droppable_blocks,
        rank_blocks,
    )

    torch.manual_seed(0)
    model = InlineCNN().eval()
    x = torch.randn(4, 3, 16, 16)
    assert droppable_blocks(model, x[:1]) == ["branch", "mlp"]
    with torch.no_grad():
        model.mlp[2].weight.mul_(1e-3)  # the mlp now adds almost nothing: it goes first
    assert rank_blocks(model, x) == ["mlp", "branch"]
    assert drop_blocks(model, 1, x) == ["mlp"] and isinstance(model.mlp, DroppedBranch)
    assert isinstance(model.norm, DroppedBlock)  # it fed the mlp alone: it goes with it
    assert droppable_blocks(model, x[:1]) == ["branch"]  # a dropped branch is no branch
    exported = _dropped_still_runs_and_exports(model, x, ["branch"])
    # only the stem, the side projection and the head compute; the norm that fed the
    # dropped mlp is dead code the exporter left out
    ops = [n.op_type for n in onnx.load_from_string(exported).graph.node]
    assert ops.count("Conv") == 2 and "BatchNormalization" not in ops, ops


def test_inline_residual_family_runs_through_structured_pruning_after_a_drop():
    from search.trial.compress.blocks import drop_blocks
    from tests.families import InlineResidualMLP

    torch.manual_seed(0)
    model = InlineResidualMLP().eval()
    x = torch.randn(8, 64)
    assert sorted(drop_blocks(model, 1, x)) in (["mlp1"], ["mlp2"])
    prune_structured(model, x[:1], 0.5, round_to=8)
    assert model(x).shape == (8, 10)


def _by_class_name(model, example):
    """The rule before structure was read: a class name ending in a block name, and an
    output of the input's shape."""
    from search.trial.compress._layers import observe
    from search.trial.compress.blocks import _BLOCK_NAME

    kept = {}

    def see(name, x, out):
        kept[name] = x.shape == out.shape

    named = {n: m for n, m in model.named_modules() if n and _BLOCK_NAME.search(type(m).__name__)}
    observe(model, named, see, example)
    return [n for n, ok in kept.items() if ok]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_blocks_are_the_ones_their_class_names_gave(arch):
    import torchvision

    from search.trial.compress.blocks import droppable_blocks

    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    found = droppable_blocks(model, example)
    assert found == _by_class_name(model, example)
    assert found == {"resnet18": ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"],
                     "mobilenet_v2": [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15,
                                                                16)]}[arch]


def test_a_vision_transformers_blocks_not_their_mlp_inside():
    """torchvision's ``EncoderBlock`` holds an ``MLPBlock``: a shape-keeping ``*Block`` the
    name rule also offered, nested in the residual, and no residual itself."""
    from search.trial.compress.blocks import droppable_blocks
    from tests.families import vit

    model = vit().eval()
    example = torch.randn(1, 3, 32, 32)
    blocks = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert droppable_blocks(model, example) == blocks
    assert _by_class_name(model, example) == [blocks[0] + ".mlp", blocks[0],
                                               blocks[1] + ".mlp", blocks[1]]


class _Gated(nn.Module):
    """A residual whose forward branches on a tensor's value: torch.fx cannot read it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return x + self.linear(x)


class GatedBlock(_Gated):
    pass


def test_an_untraceable_module_falls_back_on_its_class_name():
    from search.trial.compress.blocks import droppable_blocks

    model = nn.Sequential(nn.Linear(8, 16), _Gated(), GatedBlock(), nn.Linear(16, 10)).eval()
    assert droppable_blocks(model, torch.randn(1, 8)) == ["2"]
