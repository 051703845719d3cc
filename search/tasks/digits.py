"""The bundled default task: scikit-learn's handwritten digits, upsampled to 32x32.

The 8x8 digits are upsampled so that a compact ResNet takes ~1 ms per image on
one core: at 8x8 latency is runtime overhead and compression shows nothing
(shared/reference/cpu_onnxruntime.md, "A tiny model says nothing").
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search._paths import cache_dir
from search.tasks._base import Split, Task

__all__ = ["DigitsResNet", "make_task"]

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


def _splits(seed_split: int = 0) -> tuple[Split, Split, Split, str]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    images = F.interpolate(images, size=SIZE, mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    index = np.arange(len(labels))
    train, rest = train_test_split(
        index, test_size=0.4, random_state=seed_split, stratify=digits.target
    )
    val, test = train_test_split(
        rest, test_size=0.5, random_state=seed_split, stratify=digits.target[rest]
    )
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    digest = hashlib.sha256(digits.images.tobytes() + digits.target.tobytes()).hexdigest()
    parts = [Split(images[i], labels[i]) for i in (train, val, test)]
    return parts[0], parts[1], parts[2], digest


def _accuracy(model: nn.Module, split: Split) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(split.x).argmax(1) == split.y).float().mean()) * 100.0


def _train_teacher(train: Split, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    model = DigitsResNet()
    cfg = _TRAIN
    steps = cfg["epochs"] * ((len(train) + cfg["batch_size"] - 1) // cfg["batch_size"])
    opt = torch.optim.AdamW(model.parameters(), cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=steps)
    for _ in range(cfg["epochs"]):
        model.train()
        order = torch.randperm(len(train))
        for start in range(0, len(train), cfg["batch_size"]):
            batch = order[start : start + cfg["batch_size"]]
            shift = gen.integers(-cfg["shift"], cfg["shift"] + 1, size=2)
            xb = torch.roll(train.x[batch], shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = F.cross_entropy(model(xb), train.y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def make_task(seed: int = 0) -> Task:
    """The digits task; trains the teacher on first use and caches it by content hash."""
    train, val, test, data_digest = _splits()
    key = json.dumps(
        {
            "task": "digits",
            "data": data_digest,
            "arch": inspect.getsource(DigitsResNet) + inspect.getsource(_Block),
            "train": _TRAIN,
            "seed": seed,
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / f"digits-teacher-{digest}.pt"
    info: dict[str, float | str] = {"cache": str(path)}
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        info["trained_s"] = 0.0
    else:
        logging.getLogger("search").info(
            "training the digits teacher (first use, about a minute; cached in %s)", path.parent)
        start = time.perf_counter()
        state = _train_teacher(train, seed).state_dict()
        info["trained_s"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    task = Task(
        name="digits",
        make_model=DigitsResNet,
        teacher_state=state,
        train=train,
        val=val,
        test=test,
        input_shape=(1, SIZE, SIZE),
        num_classes=10,
        teacher_info=info,
    )
    teacher = task.teacher()
    info["test_accuracy"] = _accuracy(teacher, test)
    info["val_accuracy"] = _accuracy(teacher, val)
    return task
