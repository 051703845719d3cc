"""A bundled detection task: handwritten digits on 64x64 canvases, found by an FCOS detector.

Each canvas holds 1 to 4 of scikit-learn's digits at 12 to 26 px (:mod:`canvases`);
4,000 canvases to train on, 1,500 each to validate and test (their glyphs unseen in
training). The model is torchvision's FCOS with a ResNet-18 backbone and an FPN, built as
torchvision builds it with ``weights=None`` (one input channel; FPN and head 64 channels
wide and 2 head convolutions instead of 256 and 4, to train in minutes on 2 CPU cores).
The metric is COCO mAP@[.5:.95] in points; decoding and NMS run after the network.

    search --task digits-detection --profile cpu-avx512-vnni --budget 20
"""

from __future__ import annotations

import torch
from torch import nn

from search.tasks._base import Split, Task, TaskOptions
from search.tasks._teacher import TEACHER_SEED, TrainSettings, resolve_teacher, train_classifier
from search.tasks.canvases import canvas_splits, check_generated
from search.tasks.detection import DetectionMetric, FCOSDecoder, FCOSNetwork, decoding_note

__all__ = ["SIZE", "check", "fcos_resnet18", "make_task"]

SIZE = 64
SIZES = {"train": 4000, "val": 1500, "test": 1500}
CHANNELS = 64  # FPN and head width
_TRAIN = {"epochs": 10, "batch_size": 32, "lr": 2e-3, "weight_decay": 1e-4, "shift": 0}


def fcos_resnet18(num_classes: int = 10, channels: int = CHANNELS, head_convs: int = 2) -> FCOSNetwork:
    """torchvision's FCOS network on a ResNet-18 + FPN (P3-P5 and a pooled P6), untrained."""
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOSHead

    body = torchvision.models.resnet18(weights=None)
    body.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # grayscale canvases
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [128, 256, 512], channels)
    return FCOSNetwork(backbone=backbone, head=FCOSHead(channels, 1, num_classes, head_convs))


def check(options: TaskOptions) -> None:
    """The canvases are generated: only --teacher and --teacher-epochs apply."""
    check_generated("digits-detection", "an FCOS ResNet-18", options)


def splits() -> tuple[dict[str, Split], str]:
    """Train/val/test canvases and the glyphs' digest."""
    return canvas_splits(SIZES, SIZE, 100, "boxes")


def make_task(seed: int = 0, options: TaskOptions | None = None) -> Task:
    """The detection task; trains (a few minutes on 2 cores) and caches the teacher."""
    options = options or TaskOptions()
    check(options)
    parts, digest = splits()
    network = fcos_resnet18()
    decoder = FCOSDecoder(10, (SIZE, SIZE), tuple(network.level_sizes(torch.zeros(1, 1, SIZE, SIZE))))
    settings = {**_TRAIN, **({"epochs": options.teacher_epochs} if options.teacher_epochs else {})}
    key = {"task": "digits-detection", "data": digest, "sizes": SIZES, "model": "fcos_resnet18 v1",
           "train": settings, "seed": TEACHER_SEED}
    state, info = resolve_teacher(
        "digits-detection", fcos_resnet18, options.teacher, key,
        lambda: train_classifier(fcos_resnet18, parts["train"], TrainSettings(**settings),
                                 TEACHER_SEED, loss=decoder.loss))
    teacher = fcos_resnet18()
    teacher.load_state_dict(state)
    with torch.no_grad():
        note = decoding_note(decoder, teacher.eval()(parts["val"].x[:64]))
    return Task(name="digits-detection", make_model=fcos_resnet18, teacher_state=state,
                train=parts["train"], val=parts["val"], test=parts["test"],
                input_shape=(1, SIZE, SIZE), num_classes=10, teacher_info=info,
                metric=DetectionMetric(decoder), loss=decoder.loss, metric_name="mAP",
                decoding=note, calibration_cap=256)
