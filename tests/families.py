"""Model families built the way their users build them, small enough for the tests.

Each builder is a module-level function (a Task's ``make_model`` must be
picklable) returning an untrained model for 10 classes; ``FAMILIES`` maps a
family's name to its builder and input shape.
"""

from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import MBConvConfig
from torchvision.models.regnet import BlockParams
from torchvision.models.resnet import BasicBlock, Bottleneck

CLASSES = 10
IMAGE = (3, 32, 32)


def resnet_basic() -> nn.Module:
    return tvm.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)


def resnet_bottleneck() -> nn.Module:
    return tvm.ResNet(Bottleneck, [1, 2, 1, 1], num_classes=CLASSES, width_per_group=16)


def mobilenet_v2() -> nn.Module:
    return tvm.mobilenet_v2(num_classes=CLASSES, width_mult=0.5)


def mobilenet_v3_small() -> nn.Module:
    return tvm.mobilenet_v3_small(num_classes=CLASSES)


def efficientnet() -> nn.Module:
    """EfficientNet-B0's first stages (squeeze-excitation, stochastic depth), narrow."""
    setting = [MBConvConfig(1, 3, 1, 32, 16, 1, width_mult=0.5),
               MBConvConfig(6, 3, 2, 16, 24, 2, width_mult=0.5),
               MBConvConfig(6, 5, 2, 24, 40, 2, width_mult=0.5)]
    return tvm.EfficientNet(setting, dropout=0.2, num_classes=CLASSES)


def regnet() -> nn.Module:
    params = BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8)
    return tvm.RegNet(params, num_classes=CLASSES, stem_width=16)


def convnext() -> nn.Module:
    return tvm.ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)],
                        num_classes=CLASSES)


def densenet() -> nn.Module:
    return tvm.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                        num_classes=CLASSES)


def vit() -> nn.Module:
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                 hidden_dim=32, mlp_dim=64, num_classes=CLASSES)


class EncoderClassifier(nn.Module):
    """A vision transformer the standard PyTorch way: patch conv, ``nn.TransformerEncoder``
    of ``nn.TransformerEncoderLayer``, mean pooling, ``nn.Linear`` head."""

    def __init__(self, dim: int = 32, layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.encoder(x).mean(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, CLASSES))


class ResBlock(nn.Module):
    """A residual block of 1-D convolutions (keeps its input's shape)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1),
                                  nn.BatchNorm1d(channels), nn.ReLU(),
                                  nn.Conv1d(channels, channels, 3, padding=1),
                                  nn.BatchNorm1d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def conv1d() -> nn.Module:
    """A sequence classifier: 1-D conv stem, two residual blocks, global pooling."""
    return nn.Sequential(nn.Conv1d(4, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
                         ResBlock(32), ResBlock(32), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(32, CLASSES))


class Block1d(nn.Module):
    """A 1-D ResNet block under its user's own name: conv-bn-relu-conv-bn plus the input, or
    plus its 1x1 projection where the block downsamples (then it changes the shape)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet1d(nn.Module):
    """A ResNet for sequences: stages of 64, 128 and 256 channels, two ``Block1d`` each, the
    first of each downsampling (three of the six blocks keep their input's shape)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(channels, 64, 7, 2, 3, bias=False),
                                  nn.BatchNorm1d(64), nn.ReLU())
        self.layer1 = nn.Sequential(Block1d(64, 64, 2), Block1d(64, 64))
        self.layer2 = nn.Sequential(Block1d(64, 128, 2), Block1d(128, 128))
        self.layer3 = nn.Sequential(Block1d(128, 256, 2), Block1d(256, 256))
        self.fc = nn.Linear(256, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean(-1))


class InlineResidualMLP(nn.Module):
    """Residuals written in the model's own forward (``x = x + self.mlp1(x)``), no block
    class: one plain, one pre-norm."""

    def __init__(self, features: int = 64, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.mlp1 = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp2 = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.embed(x))
        x = x + self.mlp1(x)
        x = x + self.mlp2(self.norm2(x))
        return self.head(x)


class DenseBlock(nn.Module):
    """A width-keeping Linear + GELU + dropout, named ``*Block`` as users name such layers,
    but no residual: dropping it would not leave the network's function."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(nn.functional.gelu(self.linear(x)))


def mlp_no_norm() -> nn.Module:
    """An MLP with no normalisation layer (nothing to recalibrate) and width-keeping hidden
    layers that are not residual."""
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), DenseBlock(128), DenseBlock(128),
                         nn.Linear(128, CLASSES))


def conv3d() -> nn.Module:
    """A video / volumetric classifier: 3-D convolutions over (frames, height, width)."""
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 1),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, CLASSES))


class TextClassifier(nn.Module):
    """A text classifier the standard PyTorch way: it takes int64 token ids (``nn.Embedding``),
    then ``nn.TransformerEncoder``, mean pooling and an ``nn.Linear`` head."""

    def __init__(self, vocab: int = 100, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def make_token_task(seed: int, options):  # noqa: ANN001, ANN201 - a --task plugin
    """Sequences of 16 token ids whose class is written in their first three tokens."""
    from search.tasks import Split, Task, TrainSettings, cached_teacher, train_classifier

    def split(n: int, gen: torch.Generator) -> Split:
        y = torch.randint(0, 4, (n,), generator=gen)
        x = torch.randint(4, 100, (n, 16), generator=gen)
        x[:, :3] = y[:, None]
        return Split(x, y)

    gen = torch.Generator().manual_seed(1234)
    train, val, test = (split(n, gen) for n in (256, 128, 128))
    recipe = TrainSettings(epochs=options.teacher_epochs or 3)  # its image shift: not applied
    state, info = cached_teacher("tokens", {"version": 1, "seed": seed, **recipe.as_dict()},
                                 lambda: train_classifier(TextClassifier, train, recipe, seed))
    return Task(name="tokens", make_model=TextClassifier, teacher_state=state, train=train,
                val=val, test=test, input_shape=(16,), num_classes=4, teacher_info=info)


class TokenTagger(TextClassifier):
    """A sequence tagger (named entities, parts of speech): one label per token, logits
    ``(N, L, C)`` with the classes on the last axis, as ``nn.Linear`` leaves them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def make_tagging_task(seed: int, options):  # noqa: ANN001, ANN201 - a --task plugin
    """Sequences of 16 token ids; each token's label is its id modulo 3, flipped to 3 after
    token 99 (context matters)."""
    from search.tasks import Split, Task, TrainSettings, cached_teacher, train_classifier

    def split(n: int, gen: torch.Generator) -> Split:
        x = torch.randint(4, 100, (n, 16), generator=gen)
        y = x % 3
        y[:, 1:] = torch.where(x[:, :-1] == 99, 3, y[:, 1:])
        return Split(x, y)

    gen = torch.Generator().manual_seed(1234)
    train, val, test = (split(n, gen) for n in (256, 128, 128))
    recipe = TrainSettings(epochs=options.teacher_epochs or 4, lr=1e-2)
    state, info = cached_teacher("tagger", {"version": 1, "seed": seed, **recipe.as_dict()},
                                 lambda: train_classifier(TokenTagger, train, recipe, seed))
    return Task(name="tagger", make_model=TokenTagger, teacher_state=state, train=train,
                val=val, test=test, input_shape=(16,), num_classes=4, teacher_info=info)


def _regressor() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 1))


def mse_of_first_output(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A regression loss for a model with one output column and labels of shape (N,)."""
    return nn.functional.mse_loss(output[:, 0], target)


def r2_percent(output: torch.Tensor, target: torch.Tensor) -> float:
    """The coefficient of determination in percent: higher is better, 0 = the mean."""
    residual = ((output[:, 0] - target) ** 2).sum()
    return 100.0 * float(1 - residual / ((target - target.mean()) ** 2).sum())


def make_regression_task(seed: int, options):  # noqa: ANN001, ANN201 - a --task plugin
    """Regression on scikit-learn's diabetes data (442 patients, 10 features): float labels,
    an MSE loss and R^2 as the metric."""
    from sklearn.datasets import load_diabetes

    from search.tasks import Split, Task, TrainSettings, cached_teacher, train_classifier

    features, target = load_diabetes(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32) * 20  # columns scaled to about unit variance
    y = torch.tensor((target - target.mean()) / target.std(), dtype=torch.float32)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val, test = (Split(x[i], y[i]) for i in order.split([300, 71, 71]))
    recipe = TrainSettings(epochs=options.teacher_epochs or 30, batch_size=32, lr=3e-3, shift=0)
    state, info = cached_teacher(
        "diabetes", {"version": 1, "seed": seed, **recipe.as_dict()},
        lambda: train_classifier(_regressor, train, recipe, seed, loss=mse_of_first_output))
    return Task(name="diabetes", make_model=_regressor, teacher_state=state, train=train,
                val=val, test=test, input_shape=(10,), num_classes=1, teacher_info=info,
                metric=r2_percent, loss=mse_of_first_output)


def _segmenter() -> nn.Module:
    """A fully convolutional net: per-pixel logits from a final 1x1 convolution, no Linear."""
    def conv(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*conv(1, 16), *conv(16, 16), nn.Conv2d(16, 11, 1))


def make_segmentation_task(seed: int, options):  # noqa: ANN001, ANN201 - a --task plugin
    """Dense prediction on scikit-learn's 8x8 digits: every pixel is labelled background (0)
    or, where the stroke is, its digit plus one; logits are (N, 11, 8, 8)."""
    from sklearn.datasets import load_digits

    from search.tasks import Split, Task, TrainSettings, cached_teacher, train_classifier

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.where(x[:, 0] > 0.3, torch.tensor(digits.target)[:, None, None] + 1, 0)
    train, val, test = (Split(x[i], y[i]) for i in torch.arange(len(y)).split([1200, 300, 297]))
    recipe = TrainSettings(epochs=options.teacher_epochs or 12, shift=0)
    state, info = cached_teacher("segdigits", {"version": 1, "seed": seed, **recipe.as_dict()},
                                 lambda: train_classifier(_segmenter, train, recipe, seed))
    return Task(name="segdigits", make_model=_segmenter, teacher_state=state, train=train,
                val=val, test=test, input_shape=(1, 8, 8), num_classes=11, teacher_info=info)


FAMILIES: dict[str, tuple] = {
    "resnet-basic": (resnet_basic, IMAGE),
    "resnet-bottleneck": (resnet_bottleneck, IMAGE),
    "mobilenet-v2": (mobilenet_v2, IMAGE),
    "mobilenet-v3-small": (mobilenet_v3_small, IMAGE),
    "efficientnet": (efficientnet, IMAGE),
    "regnet": (regnet, IMAGE),
    "convnext": (convnext, IMAGE),
    "densenet": (densenet, IMAGE),
    "vit": (vit, IMAGE),
    "transformer-encoder": (EncoderClassifier, IMAGE),
    "mlp": (mlp, (64,)),
    "conv1d": (conv1d, (4, 64)),
    "conv3d": (conv3d, (3, 4, 16, 16)),
    "conv1d-resnet-custom": (ResNet1d, (4, 64)),
    "inline-residual": (InlineResidualMLP, (64,)),
    "mlp-no-bn": (mlp_no_norm, (64,)),
}


class SeriesClassifier(nn.Module):
    """A time-series classifier as users write one: a projection, a 2-layer ``nn.LSTM`` (or
    ``nn.GRU``) over the steps, a Linear on the last step. Input ``(N, steps, 3)``."""

    def __init__(self, cell: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 32)
        self.rnn = cell(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.proj(x))
        return self.head(out[:, -1])


def make_series_task(seed: int, options):  # noqa: ANN001, ANN201 - a --task plugin
    """32-step signals of 3 channels whose class is their frequency, under noise."""
    from search.tasks import Split, Task, TrainSettings, cached_teacher, train_classifier

    def split(n: int, gen: torch.Generator) -> Split:
        y = torch.randint(0, 4, (n,), generator=gen)
        phase = (y + 1).float()[:, None] * torch.linspace(0, 6.28, 32)
        x = torch.stack([phase.sin(), phase.cos(), torch.zeros_like(phase)], -1)
        return Split(x + 0.3 * torch.randn(n, 32, 3, generator=gen), y)

    gen = torch.Generator().manual_seed(1234)
    train, val, test = (split(n, gen) for n in (512, 256, 256))
    recipe = TrainSettings(epochs=options.teacher_epochs or 5, lr=1e-2, shift=0)
    state, info = cached_teacher("series", {"version": 1, "seed": seed, **recipe.as_dict()},
                                 lambda: train_classifier(SeriesClassifier, train, recipe, seed))
    return Task(name="series", make_model=SeriesClassifier, teacher_state=state, train=train,
                val=val, test=test, input_shape=(32, 3), num_classes=4, teacher_info=info)
