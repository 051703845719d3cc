"""CIFAR-10 from a local copy (never downloaded): ``--task cifar10 --data-dir ROOT``.

``ROOT`` is what ``torchvision.datasets.CIFAR10(root=ROOT, download=True)``
leaves behind: ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.
The 50,000 training images are split 45,000 train / 5,000 validation (stratified,
fixed seed); the official 10,000 test images are the test split. Default model:
ResNet-18 with a CIFAR-style stem. Training it on 2 CPU cores takes hours: train
on a GPU, or pass your own weights with ``--teacher``.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from search._base.errors import ConfigError
from search.tasks._arch import arch_builder, check_arch
from search.tasks._base import Split, Task, TaskOptions
from search.tasks._data import normalize, split_stratified
from search.tasks._teacher import TEACHER_SEED, TrainSettings, resolve_teacher, train_classifier

__all__ = ["LAYOUT", "check", "make_task"]

LAYOUT = ("DIR/cifar-10-batches-py/ with data_batch_1 ... data_batch_5, test_batch and "
          "batches.meta (the python version of CIFAR-10, as torchvision downloads it)")
_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
_TRAIN = TrainSettings(epochs=30, batch_size=128, lr=3e-3, weight_decay=5e-4, shift=4)
_DEFAULT_ARCH = "resnet18"


def check(options: TaskOptions) -> None:
    """Fail fast, before anything is written, when the data cannot be there."""
    if options.data_dir is None:
        raise ConfigError(f"--task cifar10 needs --data-dir: a directory holding {LAYOUT}")
    root = options.data_dir
    if not root.is_dir():
        raise ConfigError(f"--data-dir {root} does not exist; --task cifar10 expects {LAYOUT} "
                          "(nothing is downloaded)")
    missing = [f for f in _FILES if not (root / "cifar-10-batches-py" / f).is_file()]
    if missing:
        raise ConfigError(f"--data-dir {root} is not a CIFAR-10 directory: missing "
                          f"{', '.join('cifar-10-batches-py/' + f for f in missing)}; expected {LAYOUT}")
    if options.image_size not in (None, 32):
        raise ConfigError(f"--image-size {options.image_size}: CIFAR-10 images are 32x32")
    check_arch(options.arch or _DEFAULT_ARCH)


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR-10 batches are pickled dicts of numpy arrays and lists: refuse anything
    else a file could make pickle call (torchvision's loader unpickles without limit)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 3072 uint8, labels N) of one batch file, checked for shape and range."""
    why = ""
    try:
        with open(path, "rb") as handle:
            entry = _ArraysOnly(handle, encoding="latin1").load()
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except Exception as exc:  # truncated, not a pickle, another format
        why = f"{type(exc).__name__}: {exc}"
    else:
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            why = f"images of shape {data.shape}, expected N x 3072"
        elif len(labels) != len(data) or not len(data):
            why = f"{len(data)} images and {len(labels)} labels"
        elif labels.min() < 0 or labels.max() > 9:
            why = f"labels from {labels.min()} to {labels.max()}, expected 0-9"
    if why:
        raise ConfigError(f"{path}: not a CIFAR-10 batch, the copy is corrupted or incomplete "
                          f"({why[:200]}); expected {LAYOUT}")
    return data, labels


def _load(root: Path, train: bool) -> tuple[Split, str]:
    """The training (or test) images as a Split, and a digest of their bytes."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    parts = [_read_batch(root / "cifar-10-batches-py" / name) for name in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    digest = hashlib.sha256(data.tobytes() + labels.tobytes()).hexdigest()
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255.0
    return Split(x, torch.from_numpy(labels)), digest


def make_task(seed: int = 0, options: TaskOptions | None = None) -> Task:
    """CIFAR-10 in memory, with a teacher trained (and cached) or loaded from ``--teacher``."""
    options = options or TaskOptions()
    check(options)
    root = options.data_dir
    (train, train_digest), (test, test_digest) = _load(root, True), _load(root, False)
    train, val = split_stratified(train, 0.1)
    train, val, test = normalize(train, val, test)
    arch = options.arch or _DEFAULT_ARCH
    make_model = arch_builder(arch, 10, 3, 32)
    settings = _TRAIN
    if options.teacher_epochs is not None:
        settings = TrainSettings(**{**_TRAIN.as_dict(), "epochs": options.teacher_epochs})
    import torchvision

    key = {"task": "cifar10", "data": [train_digest, test_digest], "arch": arch,
           "torchvision": torchvision.__version__.split("+")[0], "train": settings.as_dict(),
           "seed": TEACHER_SEED}
    state, info = resolve_teacher(f"cifar10-{arch}", make_model, options.teacher, key,
                                  lambda: train_classifier(make_model, train, settings,
                                                           TEACHER_SEED))
    task = Task(name="cifar10", make_model=make_model, teacher_state=state, train=train, val=val,
                test=test, input_shape=(3, 32, 32), num_classes=10, teacher_info=info)
    return task  # scored (once per teacher and data) by load_task
