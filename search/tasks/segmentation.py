"""Semantic segmentation's metric: mean intersection over union across classes, in points.

A segmenter's network returns ``(N, C, H, W)`` logits against ``(N, H, W)`` int64 labels;
training is per-pixel cross-entropy (the default loss finds the classes on dim 1), and
the metric is torchmetrics' multiclass ``JaccardIndex`` averaged over classes ("macro":
each class counts alike, background included, so a model that paints everything
background scores ``100 / C``, not its pixel accuracy). A plugin segmenter writes
``Task(metric=MeanIoU(num_classes), metric_name="mIoU", ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MeanIoU"]


@dataclass(frozen=True)
class MeanIoU:
    """mIoU in points (0-100) of ``(N, C, H, W)`` logits against ``(N, H, W)`` labels;
    ``ignore_index`` labels (e.g. 255 on object borders) are not counted."""

    num_classes: int
    ignore_index: int | None = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        from torchmetrics.classification import MulticlassJaccardIndex

        metric = MulticlassJaccardIndex(self.num_classes, average="macro",
                                        ignore_index=self.ignore_index)
        for start in range(0, len(logits), 256):
            metric.update(logits[start : start + 256].argmax(1), labels[start : start + 256])
        return 100.0 * float(metric.compute())
