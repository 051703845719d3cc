"""Your images in class folders: ``--task imagefolder --data-dir DIR [--arch NAME]``.

Layout (torchvision ``ImageFolder``; class = subfolder name, the same classes in
every split)::

    DIR/train/<class>/*.png|jpg|...
    DIR/val/<class>/...
    DIR/test/<class>/...     optional: without it, val is split in half (stratified)
                             into validation and test

Images are converted to RGB, resized (shorter side) and centre-cropped to
``--image-size`` (default: the shorter side of the first training image, at
most 224), read once into memory and standardised per channel with the
training split's statistics. Default model: ResNet-18 (CIFAR-style stem when
the side is <= 64).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from search._base.errors import ConfigError
from search.tasks._arch import arch_builder, check_arch
from search.tasks._base import Split, Task, TaskOptions
from search.tasks._data import normalize, split_stratified, to_memory
from search.tasks._teacher import TEACHER_SEED, TrainSettings, resolve_teacher, train_classifier

__all__ = ["LAYOUT", "check", "make_task"]

LAYOUT = ("DIR/train/<class>/<image> and DIR/val/<class>/<image> (optional DIR/test/<class>/), "
          "the same class folders in each split")
_TRAIN = TrainSettings(epochs=15, batch_size=64, lr=3e-3, weight_decay=5e-4, shift=2)
_DEFAULT_ARCH = "resnet18"
_MAX_SIDE = 224


def _classes(split_dir: Path) -> dict[str, int]:
    """Class folder -> number of images in it (only folders with images count)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    counts = {}
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        n = sum(1 for f in d.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS and f.is_file())
        if n:
            counts[d.name] = n
    return counts


def _splits_present(root: Path) -> list[str]:
    return ["train", "val"] + (["test"] if (root / "test").is_dir() else [])


def check(options: TaskOptions) -> None:
    """Check the layout (cheap: no image is decoded) before anything is written."""
    root = options.data_dir
    if root is None:
        raise ConfigError(f"--task imagefolder needs --data-dir DIR laid out as {LAYOUT}")
    if not root.is_dir():
        raise ConfigError(f"--data-dir {root} does not exist; --task imagefolder expects {LAYOUT}")
    found: dict[str, dict[str, int]] = {}
    for split in _splits_present(root):
        if not (root / split).is_dir():
            raise ConfigError(f"--data-dir {root} has no {split}/ folder; expected {LAYOUT}")
        found[split] = _classes(root / split)
        if not found[split]:
            raise ConfigError(f"--data-dir {root}: {split}/ has no class folder with images "
                              f"(.png, .jpg, ...); expected {LAYOUT}")
    if len(found["train"]) < 2:
        raise ConfigError(f"--data-dir {root}: train/ has {len(found['train'])} class; a "
                          "classifier needs at least 2 class folders")
    for split, classes in found.items():
        if set(classes) != set(found["train"]):
            extra = sorted(set(classes) - set(found["train"]))
            lacking = sorted(set(found["train"]) - set(classes))
            raise ConfigError(f"--data-dir {root}: {split}/ and train/ have different classes "
                              f"(only in {split}/: {extra or 'none'}; missing from {split}/: "
                              f"{lacking or 'none'}); expected {LAYOUT}")
    if "test" not in found and min(found["val"].values()) < 2:
        raise ConfigError(f"--data-dir {root}: without a test/ folder val/ is split into "
                          "validation and test, so every val/ class needs at least 2 images")
    if options.image_size is not None and not 8 <= options.image_size <= 1024:
        raise ConfigError(f"--image-size must be between 8 and 1024 pixels, got {options.image_size}")
    check_arch(options.arch or _DEFAULT_ARCH)


def _default_size(root: Path) -> int:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    first = ImageFolder(str(root / "train")).samples[0][0]
    with Image.open(first) as img:
        return min(_MAX_SIDE, min(img.size))


def _read(split_dir: Path, size: int) -> Split:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                             transforms.ToTensor()])
    try:
        x, y = to_memory(ImageFolder(str(split_dir), transform=tf))
    except Exception as exc:  # an unreadable image
        raise ConfigError(f"cannot read the images in {split_dir}: {type(exc).__name__}: "
                          f"{str(exc)[:300]}") from None
    return Split(x, y)


def make_task(seed: int = 0, options: TaskOptions | None = None) -> Task:
    """The images in memory, with a teacher trained (and cached) or loaded from ``--teacher``."""
    options = options or TaskOptions()
    check(options)
    root = Path(options.data_dir)  # type: ignore[arg-type]
    size = options.image_size or _default_size(root)
    train, val = _read(root / "train", size), _read(root / "val", size)
    test = _read(root / "test", size) if (root / "test").is_dir() else None
    if test is None:
        val, test = split_stratified(val, 0.5)
    train, val, test = normalize(train, val, test)
    num_classes = int(train.y.max()) + 1
    arch = options.arch or _DEFAULT_ARCH
    make_model = arch_builder(arch, num_classes, 3, size)
    settings = _TRAIN
    if options.teacher_epochs is not None:
        settings = TrainSettings(**{**_TRAIN.as_dict(), "epochs": options.teacher_epochs})
    import torchvision

    digest = hashlib.sha256(train.x.numpy().tobytes() + train.y.numpy().tobytes()).hexdigest()
    key = {"task": "imagefolder", "data": digest, "size": size, "arch": arch,
           "torchvision": torchvision.__version__.split("+")[0], "train": settings.as_dict(),
           "seed": TEACHER_SEED}
    state, info = resolve_teacher(f"imagefolder-{arch}", make_model, options.teacher, key,
                                  lambda: train_classifier(make_model, train, settings,
                                                           TEACHER_SEED))
    task = Task(name="imagefolder", make_model=make_model, teacher_state=state, train=train,
                val=val, test=test, input_shape=(3, size, size), num_classes=num_classes,
                teacher_info=info)
    return task  # scored (once per teacher and data) by load_task
