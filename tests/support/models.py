"""Small models some tests build beyond the families of ``tests/families.py``."""

from __future__ import annotations

import torch
from torch import nn


class TinyViT(nn.Module):
    """Patch embedding, two PyTorch encoder layers (4 heads each), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 32, 8, 8)
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            for _ in range(2)])
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(1))
