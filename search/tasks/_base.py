"""The Task record shared by every stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Split", "Task"]


@dataclass(frozen=True)
class Split:
    """Inputs and integer labels of one data split, held in memory."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Task:
    """A trained fp32 teacher and the data to fine-tune, calibrate and score it.

    ``make_model`` builds the untrained architecture, so a student can be
    created and the teacher's weights loaded into it.
    """

    name: str
    make_model: Callable[[], nn.Module]
    teacher_state: dict[str, torch.Tensor]
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    teacher_info: dict[str, float | str] = field(default_factory=dict)
    # a pre-sparsified checkpoint of the same architecture, for sparse transfer: its zeros
    # are kept while the student is fine-tuned on this task
    sparse_state: dict[str, torch.Tensor] | None = None

    def teacher(self) -> nn.Module:
        """A fresh copy of the trained teacher in eval mode."""
        model = self.make_model()
        model.load_state_dict(self.teacher_state)
        return model.eval()

    def sparse_student(self) -> nn.Module:
        """A fresh model from the pre-sparsified checkpoint (sparse transfer)."""
        if self.sparse_state is None:
            raise ValueError(f"task {self.name!r} has no pre-sparsified checkpoint")
        model = self.make_model()
        model.load_state_dict(self.sparse_state)
        return model.eval()

    @property
    def calibration(self) -> torch.Tensor:
        """Inputs used to calibrate int8 activations (the training split)."""
        return self.train.x
