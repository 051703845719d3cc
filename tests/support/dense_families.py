"""Detectors and segmenters built the way their users build them, small enough for tests.

Each family gives a builder (module-level: a Task's ``make_model`` is pickled), its input
shape, and how its task scores and trains it: a detector's network, decoder-based mAP and
FCOS loss; a segmenter's per-pixel logits and mean IoU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search.tasks import Split, Task
from search.tasks.detection import DetectionMetric, FCOSDecoder, FCOSNetwork
from search.tasks.digits_detection import fcos_resnet18
from search.tasks.digits_segmentation import UNet
from search.tasks.segmentation import MeanIoU

DET_CLASSES = 3
SEG_CLASSES = 4
DET_IMAGE = (1, 64, 64)
SEG_IMAGE = (3, 32, 32)


def fcos_small() -> nn.Module:
    """The bundled detector's construction (torchvision FCOS, ResNet-18 + FPN)."""
    return fcos_resnet18(DET_CLASSES)


def fcos_mobilenet() -> nn.Module:
    """torchvision's FCOS on a MobileNetV3-Large backbone with an FPN (its last two stages),
    the way torchvision builds its mobile detectors, untrained, 4 head convolutions."""
    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor
    from torchvision.models.detection.fcos import FCOS

    body = mobilenet_v3_large(weights=None, width_mult=0.5)
    backbone = _mobilenet_extractor(body, fpn=True, trainable_layers=6, returned_layers=[4, 5])
    backbone.body["0"][0] = nn.Conv2d(1, backbone.body["0"][0].out_channels, 3, 2, 1, bias=False)
    return FCOSNetwork(FCOS(backbone, DET_CLASSES))


def unet() -> nn.Module:
    """The bundled segmenter's U-Net (skips concatenated), 8 wide, 3 input channels."""
    model = UNet(SEG_CLASSES, width=8)
    model.inc.net[0] = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    return model


def deeplab_mobilenet() -> nn.Module:
    """torchvision's DeepLabV3 on MobileNetV3-Large (returns ``{"out": logits}``)."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    return deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                        num_classes=SEG_CLASSES, aux_loss=False)


@dataclass(frozen=True)
class DenseFamily:
    build: Any
    shape: tuple[int, ...]
    kind: str  # detection | segmentation


DENSE_FAMILIES: dict[str, DenseFamily] = {
    "fcos-resnet18-fpn": DenseFamily(fcos_small, DET_IMAGE, "detection"),
    "unet": DenseFamily(unet, SEG_IMAGE, "segmentation"),
    "deeplabv3-mobilenet-v3": DenseFamily(deeplab_mobilenet, SEG_IMAGE, "segmentation"),
}


@functools.cache
def _decoder(build: Any, shape: tuple[int, ...]) -> FCOSDecoder:
    sizes = build().level_sizes(torch.zeros(1, *shape))
    return FCOSDecoder(DET_CLASSES, tuple(shape[-2:]), tuple(sizes))


def random_boxes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` images' padded targets: 2 boxes each, random classes and places."""
    xy = torch.randint(0, size - 20, (n, 2, 2), generator=gen).float()
    wh = torch.randint(8, 20, (n, 2, 2), generator=gen).float()
    cls = torch.randint(0, DET_CLASSES, (n, 2, 1), generator=gen).float()
    return torch.cat([cls, xy, xy + wh], dim=-1)


def dense_task(name: str, n_train: int = 64, n_eval: int = 16) -> Task:
    """Random inputs and labels, a randomly initialised teacher of family ``name``."""
    family = DENSE_FAMILIES[name]
    torch.manual_seed(0)
    teacher = family.build().eval()
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        x = torch.randn(n, *family.shape, generator=gen)
        if family.kind == "detection":
            return Split(x, random_boxes(n, family.shape[-1], gen))
        return Split(x, torch.randint(0, SEG_CLASSES, (n, *family.shape[-2:]), generator=gen))

    common = {"name": name, "make_model": family.build, "teacher_state": teacher.state_dict(),
              "train": split(n_train), "val": split(n_eval), "test": split(n_eval),
              "input_shape": family.shape}
    if family.kind == "detection":
        decoder = _decoder(family.build, family.shape)
        return Task(**common, num_classes=DET_CLASSES, metric=DetectionMetric(decoder),
                    loss=decoder.loss, metric_name="mAP")
    return Task(**common, num_classes=SEG_CLASSES, metric=MeanIoU(SEG_CLASSES), metric_name="mIoU")


class _Stages(nn.Module):
    """A user's own small backbone and FPN: three stride-2 conv stages, torchvision's
    ``FeaturePyramidNetwork`` over the last two (strides 4 and 8 on 32x32 canvases)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())
        self.stem, self.stage1, self.stage2 = stage(1, 16), stage(16, width), stage(width, 2 * width)
        self.fpn = FeaturePyramidNetwork([width, 2 * width], width)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c1 = self.stage1(self.stem(x))
        return self.fpn({"p2": c1, "p3": self.stage2(c1)})


def tiny_fcos() -> nn.Module:
    """A detector of the user's own making: ``_Stages`` + torchvision's FCOS head (one
    GroupNorm conv per branch), 3 classes."""
    from torchvision.models.detection.fcos import FCOSHead

    return FCOSNetwork(backbone=_Stages(), head=FCOSHead(32, 1, DET_CLASSES, num_convs=1))


def make_detector_task(seed: int, options):  # noqa: ANN001, ANN201 - a --task plugin
    """A user's own detector task, unlike the bundled one (its own backbone and FPN levels,
    32x32 canvases, 3 classes of digits), decoded by the plugin's own FCOSDecoder."""
    from search.tasks import TrainSettings, cached_teacher, train_classifier
    from search.tasks.canvases import make_canvases
    from search.tasks.digits import glyph_splits

    glyphs, _ = glyph_splits()
    parts = {}
    for i, (name, n) in enumerate((("train", 480), ("val", 120), ("test", 120))):
        images, labels = glyphs[name]
        keep = labels < DET_CLASSES
        c = make_canvases(images[keep], labels[keep], n, 32, seed=300 + i, scale=(10, 16))
        parts[name] = Split((c.images - 0.1) / 0.3, c.boxes)
    sizes = tiny_fcos().level_sizes(torch.zeros(1, 1, 32, 32))
    decoder = FCOSDecoder(DET_CLASSES, (32, 32), tuple(sizes), anchor_sizes=(4, 8))
    recipe = TrainSettings(epochs=options.teacher_epochs or 8, batch_size=32, lr=3e-3, shift=0)
    state, info = cached_teacher(
        "tiny-fcos-digits", {"version": 2, "seed": seed, **recipe.as_dict()},
        lambda: train_classifier(tiny_fcos, parts["train"], recipe, seed, loss=decoder.loss))
    return Task(name="tiny-fcos-digits", make_model=tiny_fcos, teacher_state=state,
                train=parts["train"], val=parts["val"], test=parts["test"],
                input_shape=(1, 32, 32), num_classes=DET_CLASSES, teacher_info=info,
                metric=DetectionMetric(decoder), loss=decoder.loss, metric_name="mAP",
                decoding="FCOS decoding and NMS in Python after the network",
                calibration_cap=128)
