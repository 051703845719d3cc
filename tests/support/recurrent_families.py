"""Recurrent model families for the conformance matrix (``RECURRENT_FAMILIES``, shaped as
``tests.families.FAMILIES``: a builder and the input shape without the batch), and a GRU
``--task`` plugin (:func:`make_gru_task`) shaped as ``tests.families.make_series_task``.

Sequences are ``(N, steps, channels)``; the classifiers read the last step's output or
the final hidden states, the two ways users write them.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.families import CLASSES

SERIES = (16, 3)  # steps, channels: small enough for a conformance cell in seconds


class GRUClassifier(nn.Module):
    """``nn.GRU`` over the steps, a Linear on the last step's output (99 % of the parameters
    in the GRU at hidden 128)."""

    def __init__(self, layers: int = 1, hidden: int = 64, channels: int = 3,
                 classes: int = CLASSES) -> None:
        super().__init__()
        self.rnn = nn.GRU(channels, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class BiLSTMClassifier(nn.Module):
    """A projection, a 2-layer bidirectional ``nn.LSTM``, a Linear on the last layer's final
    forward and backward states (``h_n[-2:]``)."""

    def __init__(self, hidden: int = 32, channels: int = 3, classes: int = CLASSES) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, 32)
        self.rnn = nn.LSTM(32, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.rnn(self.proj(x))
        return self.head(torch.cat([h[-2], h[-1]], -1))


def gru() -> nn.Module:
    return GRUClassifier(layers=1)


def gru_2layer() -> nn.Module:
    return GRUClassifier(layers=2)


def bilstm_2layer() -> nn.Module:
    return BiLSTMClassifier()


RECURRENT_FAMILIES: dict[str, tuple] = {
    "gru": (gru, SERIES),
    "gru-2layer": (gru_2layer, SERIES),
    "bilstm-2layer": (bilstm_2layer, SERIES),
}

GRU_STEPS, GRU_HIDDEN, GRU_CLASSES = 40, 128, 4


def _gru_task_model() -> nn.Module:
    return GRUClassifier(layers=2, hidden=GRU_HIDDEN, classes=GRU_CLASSES)


def gru_series(n: int, gen: torch.Generator, steps: int = GRU_STEPS) -> tuple[torch.Tensor,
                                                                               torch.Tensor]:
    """``n`` signals of 3 channels whose class is their frequency (1 to 4 periods over the
    window) under noise as strong as the signal, each at a random phase: a sine, a cosine
    and a noise channel. The noise keeps it short of trivial (about 95 % for the teacher)."""
    y = torch.randint(0, GRU_CLASSES, (n,), generator=gen)
    phase = torch.rand(n, 1, generator=gen) * 6.2832
    angle = (1 + y).float()[:, None] * torch.linspace(0, 6.2832, steps) + phase
    x = torch.stack([angle.sin(), angle.cos(), torch.zeros_like(angle)], -1)
    return x + 1.0 * torch.randn(n, steps, 3, generator=gen), y


def make_gru_task(seed: int, options):  # noqa: ANN001, ANN201 - a --task plugin
    """A 2-layer GRU classifier (hidden 128) over 40-step series, trained by the task (its
    teacher cached as the others are); val and test have 300 samples each."""
    from search.tasks import Split, Task, TrainSettings, cached_teacher, train_classifier

    gen = torch.Generator().manual_seed(4321)
    train, val, test = (Split(*gru_series(n, gen)) for n in (768, 300, 300))
    recipe = TrainSettings(epochs=options.teacher_epochs or 6, lr=1e-2, shift=0)
    state, info = cached_teacher("gru-series", {"version": 3, "seed": seed, **recipe.as_dict()},
                                 lambda: train_classifier(_gru_task_model, train, recipe, seed))
    return Task(name="gru-series", make_model=_gru_task_model, teacher_state=state, train=train,
                val=val, test=test, input_shape=(GRU_STEPS, 3), num_classes=GRU_CLASSES,
                teacher_info=info)
