"""Sequence classifiers written the way their users write them, as ``--task`` plugins.

Two models on the same synthetic signals (each class a mix of two frequencies, under noise
and a random phase, so a model must integrate over time to tell them apart):

- ``make_resnet1d_task``: a 1-D ResNet whose residual class has its own name (``ResUnit``),
  not torchvision's: layer dropping finds its blocks by their structure.
- ``make_gru_task``: a 2-layer GRU (hidden 128, 40 steps) with a Linear head on the last
  step: 99 % of its parameters are the GRU's.

    PYTHONPATH=. search --task examples.sequences:make_gru_task --profile cpu-avx512-vnni --budget 16
    PYTHONPATH=. search --task examples.sequences:make_resnet1d_task --profile cpu-avx512-vnni --budget 16

Each trains its teacher on first use (cached like the built-in ones).
"""

from __future__ import annotations

import math

import torch
from torch import nn

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


def _task(name: str, model: type[nn.Module], steps: int, noise: float, time_major: bool,
          seed: int, options, epochs: int):  # noqa: ANN001, ANN202
    from search.tasks import Split, Task, TrainSettings, cached_teacher, train_classifier

    gen = torch.Generator().manual_seed(1234)

    def split(n: int) -> Split:
        x, y = signals(n, steps, noise, gen)
        return Split(x.transpose(1, 2).contiguous() if time_major else x, y)

    train, val, test = split(3000), split(1000), split(1000)
    recipe = TrainSettings(epochs=options.teacher_epochs or epochs, lr=3e-3, shift=0)
    state, info = cached_teacher(name, {"version": 2, "noise": noise, "seed": seed, **recipe.as_dict()},
                                 lambda: train_classifier(model, train, recipe, seed))
    shape = (steps, CHANNELS) if time_major else (CHANNELS, steps)
    return Task(name=name, make_model=model, teacher_state=state, train=train, val=val,
                test=test, input_shape=shape, num_classes=CLASSES, teacher_info=info)


def make_resnet1d_task(seed: int, options):  # noqa: ANN001, ANN201 - a --task plugin
    """The 1-D ResNet on 128-step signals."""
    return _task("sequence-resnet", SequenceResNet, 128, 2.0, False, seed, options, epochs=8)


def make_gru_task(seed: int, options):  # noqa: ANN001, ANN201 - a --task plugin
    """The 2-layer GRU on 40-step signals."""
    return _task("sequence-gru", GRUClassifier, 40, 1.2, True, seed, options, epochs=12)
