import onnx

from search.compress import export_onnx, onnx_node_names
from search.evaluate import onnx_accuracy


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

    from search.compress import compressible_layers
    from search.tasks import Split, TrainSettings, train_classifier

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
