"""Reading a dataset once into memory, and the small tensor helpers tasks share."""

from __future__ import annotations

import os

import numpy as np
import torch

from search.tasks._base import Split

__all__ = ["loader_workers", "normalize", "split_stratified", "to_memory"]


def loader_workers() -> int:
    """Readers for the one-time read: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def to_memory(dataset: torch.utils.data.Dataset, batch_size: int = 256) -> tuple[torch.Tensor,
                                                                                   torch.Tensor]:
    """Every ``(x, y)`` of ``dataset`` stacked into two tensors, read by a pool of threads.

    Threads, not a DataLoader's forked workers: a process that runs Ray (a study's driver, a
    worker, a notebook) holds threads whose locks a fork copies held, and a forked reader
    then waits forever (seen in the test suite). Decoding and resizing images release the
    GIL, so threads read in parallel all the same.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=loader_workers()) as pool:
        items = list(pool.map(dataset.__getitem__, range(len(dataset)), chunksize=batch_size))
    xs = torch.stack([torch.as_tensor(x) for x, _ in items]) if items else torch.empty(0)
    ys = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
    return xs.float(), ys


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
