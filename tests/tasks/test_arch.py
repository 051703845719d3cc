"""--arch: torchvision architectures, untrained, with a CIFAR-style stem for small images."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from search._base.errors import ConfigError
from search.tasks import build_arch
from search.tasks._arch import arch_builder, check_arch


def test_resnet_gets_a_cifar_stem_for_small_images():
    model = build_arch("resnet18", 10, in_channels=1, image_side=32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1 and isinstance(model.maxpool, nn.Identity)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_auxiliary_classifiers_are_left_out():
    """GoogLeNet and Inception v3 are built without their training-only side classifiers."""
    model = build_arch("googlenet", 10, 1, 8)
    assert model.aux1 is None and model.aux2 is None
    model.train()
    assert isinstance(model(torch.zeros(2, 1, 8, 8)), torch.Tensor)


def test_large_images_keep_the_imagenet_stem():
    model = build_arch("resnet18", 5, image_side=224)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d) and model.fc.out_features == 5


def test_mobilenet_v2_first_conv_runs_at_stride_1():
    model = build_arch("mobilenet_v2", 10, image_side=32)
    assert model.features[0][0].stride == (1, 1)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_arch_suggests_names():
    with pytest.raises(ConfigError, match="unknown --arch 'resnet19'.*resnet18"):
        check_arch("resnet19")
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        check_arch("fasterrcnn_resnet50_fpn")


def test_builder_pickles_for_ray_workers():
    make = pickle.loads(pickle.dumps(arch_builder("resnet18", 3, 3, 32)))
    assert make().fc.out_features == 3


def test_vision_transformer_is_built_for_the_image_side():
    model = build_arch("vit_b_16", 10, in_channels=1, image_side=32)
    assert model.image_size == 32 and model.conv_proj.stride == (16, 16)
    assert model.conv_proj.in_channels == 1
    assert model.encoder.pos_embedding.shape[1] == 1 + (32 // 16) ** 2
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_an_image_side_the_patches_do_not_divide_is_refused():
    with pytest.raises(ConfigError, match="vit_b_16: torchvision cannot build it for 10 classes and 40x40"):
        build_arch("vit_b_16", 10, image_side=40)


@pytest.mark.parametrize("name, side, pooled", [("vgg11_bn", 32, (2, 2)), ("alexnet", 32, (1, 1))])
def test_fixed_size_pooling_fits_small_images_and_exports(name, side, pooled):
    """VGG pools to 7x7 and AlexNet to 6x6 before the classifier; on 32 px digits VGG's last
    map is 2x2, and ONNX cannot export an adaptive pooling to a size that does not divide
    its input (every trial of a vgg11_bn study failed at export). The pooling keeps a side
    that divides the map, and the first Linear takes that many features."""
    import onnx

    from search.trial.compress import export_onnx

    model = build_arch(name, 10, in_channels=1, image_side=side).eval()
    assert model.avgpool.output_size == pooled
    assert model(torch.zeros(2, 1, side, side)).shape == (2, 10)
    onnx.checker.check_model(onnx.load_from_string(export_onnx(model, (1, side, side))))


def test_an_architecture_that_cannot_take_the_image_size_is_refused_by_name():
    """torchvision's MaxViT partitions maps into 7x7 windows: it cannot run on 32 px digits.
    The task refuses it before training, naming the model and the size (it crashed with a
    traceback from inside the teacher's training)."""
    with pytest.raises(ConfigError, match=r"--arch maxvit_t cannot run on 32x32 images"):
        arch_builder("maxvit_t", 10, 1, 32)
    assert arch_builder("resnet18", 10, 1, 32)().fc.out_features == 10
