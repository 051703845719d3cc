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
