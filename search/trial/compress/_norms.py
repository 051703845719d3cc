"""GroupNorm under channel pruning: detectors' heads (torchvision's FCOS and RetinaNet v2
heads hold ``GroupNorm(32, C)``) and many segmenters normalise in groups.

torch-pruning treats a GroupNorm's groups as channel groups that must shrink alike, and
then applies the profile's channel multiple to the per-group count: a head of 64 channels
in 32 groups is never thinned at a multiple of 8. Here a GroupNorm is pruned like a
BatchNorm (any channels, any multiple) and keeps its group size where the new width
allows (so the statistics it normalises over stay as wide), else the largest group count
dividing the new width.
"""

from __future__ import annotations

import math

import torch_pruning as tp
from torch import nn

__all__ = ["GroupNormPruner"]


class GroupNormPruner(tp.pruner.function.GroupNormPruner):
    """torch-pruning's GroupNorm pruner with no channel groups and a kept group size."""

    def prune_out_channels(self, layer: nn.GroupNorm, idxs: list) -> nn.Module:
        size = layer.num_channels // layer.num_groups
        layer = super().prune_out_channels(layer, idxs)
        left = layer.num_channels
        layer.num_groups = left // size if left % size == 0 else math.gcd(layer.num_groups, left)
        return layer

    prune_in_channels = prune_out_channels

    def get_in_channel_groups(self, layer: nn.GroupNorm) -> int:
        return 1

    def get_out_channel_groups(self, layer: nn.GroupNorm) -> int:
        return 1
