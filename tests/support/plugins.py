"""Small datasets and user plugins the project does not ship, built by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# the README's example, shape for shape: a plugin the project does not ship
PLUGIN = '''
"""A user's task: a small CNN on synthetic 16x16 images whose class is the bright quadrant."""

import torch
from torch import nn

from search.tasks import Split, Task, TaskOptions, TrainSettings, cached_teacher, train_classifier


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def _split(n: int, gen: torch.Generator) -> Split:
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 1, 16, 16, generator=gen)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] += 3.0
    return Split(x, y)


def make_task(seed: int, options: TaskOptions) -> Task:
    gen = torch.Generator().manual_seed(1234)
    train, val, test = (_split(n, gen) for n in (512, 256, 256))
    recipe = TrainSettings(epochs=options.teacher_epochs or 4, shift=0)
    state, info = cached_teacher("blobs", {"version": 1, "seed": seed, **recipe.as_dict()},
                                 lambda: train_classifier(make_model, train, recipe, seed))
    return Task(name="blobs", make_model=make_model, teacher_state=state, train=train,
                val=val, test=test, input_shape=(1, 16, 16), num_classes=4, teacher_info=info)


def not_a_task(seed, options):
    return {"model": None}


def no_options(seed):
    return None


NUMBER = 3


def _float_labels(**fields):
    import dataclasses

    task = make_task(0, TaskOptions(teacher_epochs=1))
    splits = {k: Split(getattr(task, k).x, getattr(task, k).y.float())
              for k in ("train", "val", "test")}
    return dataclasses.replace(task, **splits, **fields)


def float_labels(seed, options):
    return _float_labels()


def float_labels_no_metric(seed, options):
    return _float_labels(loss=lambda out, y: ((out[:, 0] - y) ** 2).mean())


def broadcasting_loss(seed, options):
    return _float_labels(loss=torch.nn.functional.mse_loss, metric=lambda out, y: 0.0)
'''


def write_digits_tree(root: Path, per_class: dict[str, int], side: int = 16,
                      classes: int = 10) -> Path:
    """An ImageFolder tree (``root/<split>/<digit>/<n>.png``) of scikit-learn digits as PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    taken = {c: 0 for c in range(classes)}
    for split, count in per_class.items():
        for c in range(classes):
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            rows = np.flatnonzero(digits.target == c)[taken[c] : taken[c] + count]
            taken[c] += count
            for i in rows:
                pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(pixels, mode="L").resize((side, side), Image.BILINEAR).save(
                    folder / f"{i}.png")
    return root
