"""The bundled default task: scikit-learn's handwritten digits, upsampled to 32x32.

The 8x8 digits are upsampled so that a compact ResNet takes ~1 ms per image on
one core: at 8x8 latency is runtime overhead (a session's run costs a few
microseconds whatever the model), and compression shows nothing.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search._base.errors import ConfigError
from search._base.paths import cache_dir, write_atomic
from search.tasks._arch import arch_builder
from search.tasks._base import Split, Task, TaskOptions
from search.tasks._teacher import TEACHER_SEED, TrainSettings, resolve_teacher, train_classifier

__all__ = ["DigitsResNet", "check", "glyph_splits", "make_task"]

SIZE = 32
_TRAIN = {"epochs": 12, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4, "shift": 2}


class _Block(nn.Module):
    """A ResNet basic block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A three-stage ResNet for 1x32x32 inputs (~48 M MACs at width 32)."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = _Block(width, width, 1)
        self.layer2 = _Block(width, 2 * width, 2)
        self.layer3 = _Block(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images 8x8 in 0..16, labels) from the copy scikit-learn ships, read as
    ``sklearn.datasets.load_digits`` reads it, without importing scikit-learn
    (seconds at every start of a command and of every Ray worker)."""
    import gzip
    from importlib.util import find_spec

    spec = find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the digits task needs scikit-learn, which ships the data: "
                          "pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as handle:
        data = np.loadtxt(handle, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _split_indices(labels: np.ndarray, seed_split: int, digest: str) -> list[np.ndarray]:
    """Train/val/test indices (60/20/20, stratified), cached beside the teachers: the split
    that trained a cached teacher must never change under it, and computing it needs
    scikit-learn (seconds to import)."""
    path = cache_dir() / f"digits-split-{seed_split}-{digest[:16]}.npz"
    try:
        with np.load(path) as saved:
            return [saved[k] for k in ("train", "val", "test")]
    except (OSError, KeyError, ValueError):
        pass
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, rest = train_test_split(index, test_size=0.4, random_state=seed_split,
                                   stratify=labels)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed_split,
                                 stratify=labels[rest])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda handle: np.savez(handle, train=train, val=val, test=test))
    return [train, val, test]


def _splits(seed_split: int = 0) -> tuple[Split, Split, Split, str]:
    raw, target = _load_digits()
    images = torch.tensor(raw / 16.0, dtype=torch.float32)[:, None]
    images = F.interpolate(images, size=SIZE, mode="bilinear", align_corners=False)
    labels = torch.tensor(target, dtype=torch.long)
    digest = hashlib.sha256(raw.tobytes() + target.tobytes()).hexdigest()
    train, val, test = _split_indices(target, seed_split, digest)
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    parts = [Split(images[i], labels[i]) for i in (train, val, test)]
    return parts[0], parts[1], parts[2], digest


def glyph_splits() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """The 8x8 glyphs (0..16) and labels of the train, val and test splits (the task's own
    60/20/20 split), and the data's digest: what the canvas tasks paste."""
    raw, target = _load_digits()
    digest = hashlib.sha256(raw.tobytes() + target.tobytes()).hexdigest()
    idx = _split_indices(target, 0, digest)
    return {name: (raw[i], target[i]) for name, i in zip(("train", "val", "test"), idx,
                                                           strict=True)}, digest


def check(options: TaskOptions) -> None:
    """The digits are bundled and 32x32: only --arch, --teacher and --teacher-epochs apply."""
    if options.data_dir is not None:
        raise ConfigError("--data-dir does not apply to the digits task (its data ships with "
                          "scikit-learn); use --task cifar10 or --task imagefolder for your data")
    if options.image_size not in (None, SIZE):
        raise ConfigError(f"--image-size {options.image_size}: the digits task is {SIZE}x{SIZE}; "
                          "--image-size applies to --task imagefolder")
    if options.arch is not None:  # known, and runs at 32x32: before the study writes anything
        arch_builder(options.arch, 10, 1, SIZE)
    if options.teacher_epochs is not None and options.teacher_epochs < 1:
        raise ConfigError(f"--teacher-epochs must be at least 1, got {options.teacher_epochs}")


def make_task(seed: int = 0, options: TaskOptions | None = None) -> Task:
    """The digits task; trains the teacher on first use and caches it by content hash.

    ``options.arch`` swaps the bundled DigitsResNet for a torchvision
    architecture (CIFAR-style stem, one input channel), e.g. ``resnet18``.
    """
    options = options or TaskOptions()
    check(options)
    train, val, test, data_digest = _splits()
    settings = _TRAIN
    if options.teacher_epochs is not None:
        settings = {**_TRAIN, "epochs": options.teacher_epochs}
    if options.arch is None:
        make_model = DigitsResNet
        arch = inspect.getsource(DigitsResNet) + inspect.getsource(_Block)
    else:
        import torchvision

        make_model = arch_builder(options.arch, 10, 1, SIZE)
        arch = f"torchvision {torchvision.__version__.split('+')[0]} {options.arch} small-stem"
    key = {"task": "digits", "data": data_digest, "arch": arch, "train": settings, "seed": TEACHER_SEED}
    state, info = resolve_teacher(
        "digits" if options.arch is None else f"digits-{options.arch}", make_model,
        options.teacher, key,
        lambda: train_classifier(make_model, train, TrainSettings(**settings),
                                 TEACHER_SEED))
    task = Task(
        name="digits",
        make_model=make_model,
        teacher_state=state,
        train=train,
        val=val,
        test=test,
        input_shape=(1, SIZE, SIZE),
        num_classes=10,
        teacher_info=info,
    )
    return task  # scored (once per teacher and data) by load_task
