"""Any torchvision classification architecture, untrained, sized for the task's images.

Small images (side <= ``SMALL_SIDE``) get a CIFAR-style stem: the first
convolution runs at stride 1 (a 7x7 one becomes 3x3) and a max-pool right
after it is removed, so a 32x32 input is not shrunk to 8x8 before the first
block (for ResNets this is the usual CIFAR ResNet). Inputs with other than 3
channels get a first convolution with that many input channels.

VGG and AlexNet pool their last feature map to a fixed 7x7 / 6x6 before the
classifier; on small images that map is smaller (1x1 for VGG at 32 px), and
ONNX cannot export an adaptive pooling whose output is not a divisor of its
input, so the pooling there keeps the map's own side and the first Linear takes
that many features (the classifier is trained from scratch anyway).

Vision transformers are built for the task's image side instead (torchvision's
``VisionTransformer`` takes ``image_size``; its position embedding has one
entry per patch) and keep their patch embedding: a 32x32 image is four 16x16
patches, the sequence its encoder was made for, only shorter.
"""

from __future__ import annotations

import functools

from torch import nn

from search._base.errors import ConfigError

__all__ = ["SMALL_SIDE", "arch_builder", "build_arch", "check_arch", "known_archs"]

SMALL_SIDE = 64


@functools.cache
def known_archs() -> tuple[str, ...]:
    """The classification models torchvision can build (no detection/segmentation/video)."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def check_arch(name: str) -> None:
    """Raise ConfigError unless ``name`` is a torchvision classification architecture."""
    archs = known_archs()
    if name not in archs:
        close = [a for a in archs if a.startswith(name[:4])] or list(archs[:12])
        raise ConfigError(f"unknown --arch {name!r}: not a torchvision classification model; "
                          f"for example {', '.join(close)} (all: torchvision.models.list_models())")


def _sized_by_image(name: str) -> bool:
    """Whether the builder needs the image side (a position embedding per patch)."""
    import torchvision

    return torchvision.models.get_model_builder(name).__module__.endswith(".vision_transformer")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _adapt_stem(model: nn.Module, in_channels: int, small: bool) -> None:
    """First convolution: ``in_channels`` inputs; for small images stride 1, no max-pool."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return
    name, conv = convs[0]
    if small or conv.in_channels != in_channels:
        k = conv.kernel_size
        stride = conv.stride
        padding = conv.padding
        if small:
            k = (3, 3) if k == (7, 7) else k
            stride, padding = (1, 1), (k[0] // 2, k[1] // 2)
        _set(model, name, nn.Conv2d(in_channels, conv.out_channels, k, stride, padding,
                                    groups=1, bias=conv.bias is not None))
    if not small:
        return
    second = convs[1][0] if len(convs) > 1 else None
    for n, m in model.named_modules():
        if n == second:
            break
        if isinstance(m, nn.MaxPool2d):
            _set(model, n, nn.Identity())
            break


def _fit_pooling(model: nn.Module, in_channels: int, image_side: int) -> None:
    """Shrink a fixed-size adaptive pooling (VGG's 7x7) to a side that divides the feature
    map it gets at ``image_side``, and its classifier's first Linear with it."""
    import torch

    pool = getattr(model, "avgpool", None)
    if not isinstance(pool, nn.AdaptiveAvgPool2d):
        return
    out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
    if out == (1, 1):  # divides any map: nothing to fit, no forward pass to pay
        return
    seen: list[torch.Size] = []
    handle = pool.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, image_side, image_side))
    except Exception:  # noqa: BLE001 - the model cannot run at this size: said elsewhere
        return
    finally:
        handle.remove()
    if not seen or None in out:
        return
    channels, height, width = seen[0][1:]
    side = (max(d for d in range(1, out[0] + 1) if height % d == 0),
            max(d for d in range(1, out[1] + 1) if width % d == 0))
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), None)
    if side == tuple(out) or first is None:
        return
    linear = model.get_submodule(first)
    if linear.in_features != channels * out[0] * out[1]:
        return
    model.avgpool = nn.AdaptiveAvgPool2d(side)
    _set(model, first, nn.Linear(channels * side[0] * side[1], linear.out_features,
                                 bias=linear.bias is not None))


# architectures whose torchvision builders add auxiliary classifiers by default
_AUXILIARY = ("googlenet", "inception_v3")


def build_arch(name: str, num_classes: int, in_channels: int = 3, image_side: int = 224) -> nn.Module:
    """An untrained ``torchvision.models.get_model(name, weights=None, num_classes=...)``."""
    import torchvision

    check_arch(name)
    sized = _sized_by_image(name)
    extra = {"image_size": image_side} if sized else {}
    if name in _AUXILIARY:  # training-only side classifiers: nothing a deployment runs
        extra["aux_logits"] = False
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    except Exception as exc:
        size = f" and {image_side}x{image_side} images" if sized else ""
        raise ConfigError(f"--arch {name}: torchvision cannot build it for {num_classes} classes{size} "
                          f"({type(exc).__name__}: {exc})") from None
    _adapt_stem(model, in_channels, image_side <= SMALL_SIDE and not sized)
    _fit_pooling(model, in_channels, image_side)
    return model


def arch_builder(name: str, num_classes: int, in_channels: int, image_side: int):  # noqa: ANN201
    """A picklable ``make_model`` for a Task (Ray ships it to the workers), after one
    forward pass at the task's image size: an architecture that cannot take it (MaxViT's
    7x7 windows need sides that are multiples of 224) fails here, with its name and the
    size, not in the middle of training the teacher."""
    check_arch(name)
    _check_runs(name, num_classes, in_channels, image_side)
    return functools.partial(build_arch, name, num_classes, in_channels, image_side)


@functools.cache
def _check_runs(name: str, num_classes: int, in_channels: int, image_side: int) -> None:
    """Once per process: the flag checks, the task and every Ray worker's task ask again."""
    import torch

    try:
        with torch.no_grad():
            build_arch(name, num_classes, in_channels, image_side).eval()(
                torch.zeros(1, in_channels, image_side, image_side))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises, say which and why
        raise ConfigError(f"--arch {name} cannot run on {image_side}x{image_side} images "
                          f"({type(exc).__name__}: {exc}); pick another architecture, or a "
                          "task and --image-size it is made for") from None
