"""Digits on canvases: real handwritten digits (scikit-learn's) pasted at varied scales and
positions, several per image, with their boxes and per-pixel masks.

The data of the bundled detection and segmentation tasks. Each split draws its digits from
its own share of the 1,797 glyphs (60/20/20, stratified), so validation and test score
glyphs no model trained on; the canvases are generated, so the eval splits can be as large
as a metric point needs (1,000+ images each). Generation is seeded and takes about a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from search._base.errors import ConfigError
from search.tasks._base import Split, TaskOptions

__all__ = ["MAX_OBJECTS", "Canvases", "canvas_splits", "check_generated", "make_canvases"]

MAX_OBJECTS = 4  # digits per canvas at most (boxes are padded to this many)


@dataclass(frozen=True)
class Canvases:
    """``images`` (N, 1, S, S) in [0, 1]; ``boxes`` (N, MAX_OBJECTS, 5) rows of
    ``[class, x1, y1, x2, y2]`` in pixels, class -1 for padding; ``masks`` (N, S, S) int64,
    0 background and ``class + 1`` on a digit's strokes."""

    images: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def make_canvases(glyphs: np.ndarray, labels: np.ndarray, n: int, size: int, seed: int, *,
                  scale: tuple[int, int] = (12, 26), noise: float = 0.05) -> Canvases:
    """``n`` canvases of ``size`` px, each holding 1 to MAX_OBJECTS digits drawn from
    ``glyphs`` (8x8, 0..16) scaled to ``scale`` px (square), overlapping little (IoU < 0.1),
    on a background of Gaussian ``noise``."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), np.float32)
    boxes = np.full((n, MAX_OBJECTS, 5), -1.0, np.float32)
    masks = np.zeros((n, size, size), np.int64)
    sources = torch.tensor(glyphs / 16.0, dtype=torch.float32)[:, None]
    for i in range(n):
        placed: list[np.ndarray] = []
        for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
            for _attempt in range(20):
                s = int(rng.integers(scale[0], scale[1] + 1))
                x, y = (int(v) for v in rng.integers(0, size - s + 1, size=2))
                box = np.array([x, y, x + s, y + s], np.float32)
                if all(_iou(box, other) < 0.1 for other in placed):
                    break
            else:
                continue
            k = int(rng.integers(len(glyphs)))
            digit = F.interpolate(sources[k : k + 1], size=(s, s), mode="bilinear",
                                  align_corners=False)[0, 0].numpy()
            region = images[i, y : y + s, x : x + s]
            np.maximum(region, digit, out=region)
            masks[i, y : y + s, x : x + s][digit > 0.3] = labels[k] + 1
            boxes[i, len(placed)] = [labels[k], *box]
            placed.append(box)
    images += noise * rng.standard_normal(images.shape).astype(np.float32)
    return Canvases(torch.from_numpy(images[:, None]), torch.from_numpy(boxes),
                    torch.from_numpy(masks))


def canvas_splits(sizes: dict[str, int], size: int, seed: int,
                  labels: str) -> tuple[dict[str, Split], str]:
    """Train/val/test canvases of ``size`` px, ``sizes[split]`` of each, every split pasting
    its own share of the digits' glyphs; images normalised, labels the padded ``boxes`` or
    the per-pixel ``masks``. Returns them with the glyphs' digest (a teacher's cache key)."""
    from search.tasks.digits import glyph_splits

    glyphs, digest = glyph_splits()
    parts = {}
    for i, (name, (images, classes)) in enumerate(glyphs.items()):
        c = make_canvases(images, classes, sizes[name], size, seed=seed + i)
        parts[name] = Split((c.images - 0.1) / 0.3, getattr(c, labels))
    return parts, digest


def check_generated(task: str, model: str, options: TaskOptions) -> None:
    """A canvas task's options: its data is generated and its model fixed, so only
    --teacher and --teacher-epochs apply."""
    for name, value in (("--data-dir", options.data_dir), ("--arch", options.arch),
                        ("--image-size", options.image_size)):
        if value is not None:
            raise ConfigError(f"{name} does not apply to the {task} task (generated canvases, "
                              f"{model}); bring your own model as a plugin task (see "
                              "docs/dense-prediction.md)")
    if options.teacher_epochs is not None and options.teacher_epochs < 1:
        raise ConfigError(f"--teacher-epochs must be at least 1, got {options.teacher_epochs}")
