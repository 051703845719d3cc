"""Reading a dataset once into memory, and the small tensor helpers tasks share."""

from __future__ import annotations

import os

import numpy as np
import torch

from search.tasks._base import Split

__all__ = ["loader_workers", "normalize", "split_stratified", "to_memory"]


def loader_workers() -> int:
    """DataLoader workers for the one-time read: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def to_memory(dataset: torch.utils.data.Dataset, batch_size: int = 256) -> tuple[torch.Tensor,
                                                                                   torch.Tensor]:
    """Every ``(x, y)`` of ``dataset`` stacked into two tensors (read in parallel workers)."""
    workers = loader_workers()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=workers if workers > 1 else 0)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(torch.as_tensor(y, dtype=torch.long))
    return torch.cat(xs).float(), torch.cat(ys)


def normalize(train: Split, *others: Split) -> list[Split]:
    """Every split standardised per channel with the training split's mean and std."""
    dims = [0] + list(range(2, train.x.dim()))
    mean = train.x.mean(dim=dims, keepdim=True)
    std = train.x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return [Split((s.x - mean) / std, s.y) for s in (train, *others)]


def split_stratified(split: Split, fraction: float, seed: int = 0) -> tuple[Split, Split]:
    """``split`` cut in two, ``fraction`` of each class in the second part (fixed seed)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(split))
    first, second = train_test_split(index, test_size=fraction, random_state=seed,
                                     stratify=split.y.numpy())
    first, second = np.sort(first), np.sort(second)
    return Split(split.x[first], split.y[first]), Split(split.x[second], split.y[second])
