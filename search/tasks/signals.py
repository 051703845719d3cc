"""A bundled task with eval splits that resolve a point: generated signals, 2,000 to score on.

The digits have 359 validation and 360 test images: one point of accuracy is 3.6 images, so
"within 1 point" is decided by a handful of them. Here 4-channel signals are generated
(each of 6 classes a mix of two frequencies under a random phase per channel and strong
noise), 6,000 to train on and 2,000 each to validate and test: one point is 20 samples.

Two models, written as their users write them:

- the default, a 1-D ResNet whose residual class has its own name (``ResUnit``, not
  torchvision's): layer dropping finds its blocks by their structure;
- ``--arch gru``: a 2-layer GRU (hidden 128) over 40 steps with a Linear on the last step,
  99 % of its parameters in the GRU;
- ``--arch transformer``: ``nn.TransformerEncoder`` (2 layers, width 64, 4 heads) over
  the same 40 steps, mean-pooled into a Linear.

    search --task signals --profile cpu-avx512-vnni --budget 20
    search --task signals --arch gru --profile cpu-avx512-vnni --budget 16
    search --task signals --arch transformer --profile cpu-avx512-vnni --budget 16
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from search._base.errors import ConfigError
from search.tasks._base import Split, Task, TaskOptions
from search.tasks._teacher import TEACHER_SEED, TrainSettings, resolve_teacher, train_classifier

__all__ = ["CLASSES", "GRUClassifier", "SequenceResNet", "SignalTransformer", "check",
           "make_task", "signals"]

CLASSES = 6
CHANNELS = 4


def signals(n: int, steps: int, noise: float,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` signals of ``CHANNELS`` x ``steps`` and their classes: class k mixes frequencies
    k + 1 and 2k + 3 over the window, each channel at its own random phase, plus Gaussian
    ``noise`` (its standard deviation)."""
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    t = torch.linspace(0, 2 * math.pi, steps)
    phase = torch.rand(n, CHANNELS, 1, generator=gen) * 2 * math.pi
    low = ((y + 1).float()[:, None, None] * t + phase).sin()
    high = 0.5 * ((2 * y + 3).float()[:, None, None] * t + phase).sin()
    return low + high + noise * torch.randn(n, CHANNELS, steps, generator=gen), y


class ResUnit(nn.Module):
    """conv-bn-relu-conv-bn plus the input (plus its 1x1 projection where it downsamples)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm1d(cout), nn.ReLU(),
            nn.Conv1d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm1d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class SequenceResNet(nn.Module):
    """Stages of 64, 128 and 256 channels, two ``ResUnit`` s each, the first downsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(CHANNELS, 64, 7, 2, 3, bias=False),
                                  nn.BatchNorm1d(64), nn.ReLU())
        self.stages = nn.Sequential(ResUnit(64, 64), ResUnit(64, 64),
                                    ResUnit(64, 128, 2), ResUnit(128, 128),
                                    ResUnit(128, 256, 2), ResUnit(256, 256))
        self.head = nn.Linear(256, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(-1))


class GRUClassifier(nn.Module):
    """A 2-layer GRU over the steps of ``(N, steps, CHANNELS)``, a Linear on the last step."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.gru = nn.GRU(CHANNELS, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class SignalTransformer(nn.Module):
    """``nn.TransformerEncoder`` over the steps of ``(N, steps, CHANNELS)``: each step
    embedded by a Linear plus a learned position, the encoder's outputs mean-pooled into a
    Linear, as a user writes a small sequence transformer."""

    def __init__(self, steps: int = 40, width: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(CHANNELS, width)
        self.position = nn.Parameter(torch.zeros(1, steps, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width,
                                           dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.position).mean(1))


# per model: steps, noise, whether time comes first (a GRU's batch_first input), epochs
_MODELS = {None: (SequenceResNet, 128, 2.0, False, 8), "gru": (GRUClassifier, 40, 1.2, True, 12),
           "transformer": (SignalTransformer, 40, 1.2, True, 12)}
SPLITS = (6000, 2000, 2000)


def check(options: TaskOptions) -> None:
    """The signals are generated: only --arch (the default 1-D ResNet, gru or transformer),
    --teacher and --teacher-epochs apply."""
    if options.data_dir is not None or options.image_size is not None:
        raise ConfigError("--data-dir and --image-size do not apply to the signals task (its "
                          "data is generated)")
    if options.arch not in _MODELS:
        raise ConfigError(f"--arch {options.arch!r} is not a model of the signals task; choose "
                          "gru or transformer, or leave --arch out for its 1-D ResNet")
    if options.teacher_epochs is not None and options.teacher_epochs < 1:
        raise ConfigError(f"--teacher-epochs must be at least 1, got {options.teacher_epochs}")


def make_task(seed: int = 0, options: TaskOptions | None = None) -> Task:
    """The signals task; trains the teacher on first use (a few minutes on 2 cores) and
    caches it."""
    options = options or TaskOptions()
    check(options)
    model, steps, noise, time_major, epochs = _MODELS[options.arch]
    gen = torch.Generator().manual_seed(1234)

    def split(n: int) -> Split:
        x, y = signals(n, steps, noise, gen)
        return Split(x.transpose(1, 2).contiguous() if time_major else x, y)

    train, val, test = (split(n) for n in SPLITS)
    recipe = TrainSettings(epochs=options.teacher_epochs or epochs, lr=3e-3, shift=0)
    name = "signals" if options.arch is None else f"signals-{options.arch}"
    key = {"version": 1, "splits": SPLITS, "steps": steps, "noise": noise,
           "model": inspect.getsource(model), "seed": TEACHER_SEED, **recipe.as_dict()}
    state, info = resolve_teacher(name, model, options.teacher, key,
                                  lambda: train_classifier(model, train, recipe, TEACHER_SEED))
    shape = (steps, CHANNELS) if time_major else (CHANNELS, steps)
    return Task(name="signals", make_model=model, teacher_state=state, train=train, val=val,
                test=test, input_shape=shape, num_classes=CLASSES, teacher_info=info)
