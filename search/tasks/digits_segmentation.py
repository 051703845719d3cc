"""A bundled segmentation task: each pixel of a 64x64 canvas labelled with its digit's class.

The canvases of :mod:`search.tasks.canvases` (1 to 4 digits each, 12 to 26 px), with
per-pixel masks: 0 background, ``d + 1`` on the strokes of digit ``d`` (11 classes).
4,000 to train on, 1,500 each to validate and test (glyphs unseen in training). The model
is a U-Net written as its users write it (double-conv blocks, max-pool down, bilinear up,
skip connections by concatenation); the metric is mean IoU over the 11 classes.

    search --task digits-segmentation --profile cpu-avx512-vnni --budget 20
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from search.tasks._base import Split, Task, TaskOptions
from search.tasks._teacher import TEACHER_SEED, TrainSettings, resolve_teacher, train_classifier
from search.tasks.canvases import canvas_splits, check_generated
from search.tasks.segmentation import MeanIoU

__all__ = ["SIZE", "UNet", "check", "make_task"]

SIZE = 64
CLASSES = 11
SIZES = {"train": 4000, "val": 1500, "test": 1500}
_TRAIN = {"epochs": 10, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4, "shift": 0}


class DoubleConv(nn.Module):
    """(conv 3x3, BN, ReLU) twice."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Up(nn.Module):
    """Upsample 2x, concatenate the encoder's skip, DoubleConv."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv = DoubleConv(cin + skip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """A four-level U-Net (widths w, 2w, 4w, 8w) for 1-channel images."""

    def __init__(self, num_classes: int = CLASSES, width: int = 16) -> None:
        super().__init__()
        w = width
        self.inc = DoubleConv(1, w)
        self.down1 = DoubleConv(w, 2 * w)
        self.down2 = DoubleConv(2 * w, 4 * w)
        self.down3 = DoubleConv(4 * w, 8 * w)
        self.up1 = Up(8 * w, 4 * w, 4 * w)
        self.up2 = Up(4 * w, 2 * w, 2 * w)
        self.up3 = Up(2 * w, w, w)
        self.outc = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(F.max_pool2d(x1, 2))
        x3 = self.down2(F.max_pool2d(x2, 2))
        x4 = self.down3(F.max_pool2d(x3, 2))
        return self.outc(self.up3(self.up2(self.up1(x4, x3), x2), x1))


def check(options: TaskOptions) -> None:
    """The canvases are generated: only --teacher and --teacher-epochs apply."""
    check_generated("digits-segmentation", "a U-Net", options)


def splits() -> tuple[dict[str, Split], str]:
    """Train/val/test canvases and the glyphs' digest."""
    return canvas_splits(SIZES, SIZE, 200, "masks")


def make_task(seed: int = 0, options: TaskOptions | None = None) -> Task:
    """The segmentation task; trains (minutes on 2 cores) and caches the teacher."""
    options = options or TaskOptions()
    check(options)
    parts, digest = splits()
    settings = {**_TRAIN, **({"epochs": options.teacher_epochs} if options.teacher_epochs else {})}
    key = {"task": "digits-segmentation", "data": digest, "sizes": SIZES,
           "model": inspect.getsource(UNet) + inspect.getsource(Up), "train": settings,
           "seed": TEACHER_SEED}
    state, info = resolve_teacher(
        "digits-segmentation", UNet, options.teacher, key,
        lambda: train_classifier(UNet, parts["train"], TrainSettings(**settings), TEACHER_SEED))
    return Task(name="digits-segmentation", make_model=UNet, teacher_state=state,
                train=parts["train"], val=parts["val"], test=parts["test"],
                input_shape=(1, SIZE, SIZE), num_classes=CLASSES, teacher_info=info,
                metric=MeanIoU(CLASSES), metric_name="mIoU", calibration_cap=256)
