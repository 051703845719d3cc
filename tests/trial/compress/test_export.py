import onnx

from search.trial.compress import export_onnx, onnx_node_names
from search.trial.evaluate import onnx_accuracy


def test_every_layer_maps_to_an_onnx_node(task, layers):
    model = onnx.load_from_string(export_onnx(task.teacher(), task.input_shape))
    names = onnx_node_names(model, layers)
    assert set(names) == {layer.name for layer in layers}
    by_name = {n.name: n.op_type for n in model.graph.node}
    for layer in layers:
        assert by_name[names[layer.name]] == layer.op_type
    assert "BatchNormalization" not in set(by_name.values())  # folded at export


def test_exported_model_scores_like_the_teacher(task):
    fp32 = export_onnx(task.teacher(), task.input_shape)
    assert abs(onnx_accuracy(fp32, task.test) - task.teacher_info["test_accuracy"]) < 0.3


def test_training_only_auxiliary_classifiers_get_no_precision():
    """torchvision's GoogLeNet as users build it (auxiliary classifiers on): those run in
    training only, so they are not in the exported model and get no precision; its
    training-mode output (main and auxiliary logits) trains through the main logits."""
    import torch
    import torchvision.models as tvm

    from search.tasks import Split, TrainSettings, train_classifier
    from search.trial.compress import compressible_layers

    model = tvm.GoogLeNet(num_classes=4, aux_logits=True, init_weights=False).eval()
    example = torch.zeros(1, 3, 32, 32)
    every = {layer.name for layer in compressible_layers(model)}
    layers = compressible_layers(model, example)
    assert {"aux1.fc2", "aux2.conv.conv"} <= every - {layer.name for layer in layers}
    names = onnx_node_names(onnx.load_from_string(export_onnx(model, (3, 32, 32))), layers)
    assert set(names) == {layer.name for layer in layers}  # each maps to its ONNX node

    data = Split(torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,)))
    trained = train_classifier(lambda: tvm.GoogLeNet(num_classes=4, aux_logits=True,
                                                     init_weights=False),
                               data, TrainSettings(epochs=1, batch_size=16), seed=0)
    assert trained(example).shape == (1, 4)


def test_every_convolution_layout_gets_a_precision_and_a_width():
    """1-D (signals) and 3-D (video, volumes) convolutions are layers like 2-D ones: each
    gets a precision mapped to its ONNX node, and structured pruning is offered and thins
    them (3-D ones were once left out of every stage: no precision, no pruning)."""
    import torch
    from torch import nn

    from search.trial.compress import compressible_layers
    from search.trial.compress.applicable import applicable
    from search.trial.compress.prune import prune_structured
    from tests.families import FAMILIES

    for family in ("conv1d", "conv3d"):
        build, shape = FAMILIES[family]
        model = build().eval()
        example = torch.zeros(1, *shape)
        convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv3d)}
        layers = compressible_layers(model, example)
        assert convs <= {layer.name for layer in layers}
        names = onnx_node_names(onnx.load_from_string(export_onnx(model, shape)), layers)
        assert set(names) == {layer.name for layer in layers}
        assert applicable(model, "structured", example) == (True, "")
        full = sum(p.numel() for p in model.parameters())
        prune_structured(model, example, 0.5, 8)
        assert sum(p.numel() for p in model.parameters()) < 0.6 * full


def test_an_adaptive_pooling_onnx_cannot_export_is_named_with_the_fix():
    """torchvision's VGG on 32 px inputs as a plugin would build it (the --arch builder adapts
    it): the exporter names only the operator, the trial's error says what to change."""
    import pytest
    import torch
    from torch import nn

    from search._base.errors import TrialError

    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=8), nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                          nn.Linear(4 * 49, 10)).eval()
    with pytest.raises(TrialError, match="pooling size that divides the map"):
        export_onnx(model, (1, 32, 32))
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)  # PyTorch itself runs it
