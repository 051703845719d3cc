"""A vision transformer built the standard PyTorch way, as a ``--task`` plugin on the digits.

Patch-embedding conv, ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer``,
mean pooling, ``nn.Linear`` head. A study on
it exercises layer dropping, head pruning and feed-forward thinning on
PyTorch's own encoder:

    PYTHONPATH=. search --task examples.encoder_digits:make_task \\
        --profile cpu-avx512-vnni --budget 8
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from search.tasks import Task, TaskOptions, TrainSettings, cached_teacher, load_task, train_classifier


class EncoderDigits(nn.Module):
    """4x4 patches of a 32x32 grey digit, three encoder layers of width 64, four heads."""

    def __init__(self, dim: int = 64, layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.encoder(x).mean(1))


def make_task(seed: int, options: TaskOptions) -> Task:
    """The digits data with an EncoderDigits teacher (trained once, cached)."""
    digits = load_task("digits", seed)
    recipe = TrainSettings(epochs=options.teacher_epochs or 12, lr=1e-3)
    state, info = cached_teacher(
        "digits-encoder", {"version": 1, "seed": seed, **recipe.as_dict()},
        lambda: train_classifier(EncoderDigits, digits.train, recipe, seed))
    return dataclasses.replace(digits, name="digits-encoder", make_model=EncoderDigits,
                               teacher_state=state, teacher_info=info)
