"""Fine-tuning with response distillation from the fp32 teacher (Hinton et al. 2015)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from search.errors import TrialError
from search.tasks import Split

__all__ = ["distill", "distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """``alpha`` * T^2 * KL(teacher_T || student_T) + (1 - ``alpha``) * cross-entropy."""
    hard = F.cross_entropy(student_logits, labels)
    if alpha <= 0:
        return hard
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    return alpha * soft + (1 - alpha) * hard


def distill(student: nn.Module, teacher: nn.Module, train: Split, *, epochs: int, lr: float,
            temperature: float, alpha: float, seed: int, batch_size: int = 64) -> nn.Module:
    """Fine-tune ``student`` in place; zero epochs returns it untouched (one-shot)."""
    if epochs <= 0:
        return student.eval()
    torch.manual_seed(seed)
    teacher.eval()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(epochs):
        student.train()
        order = torch.randperm(len(train))
        for start in range(0, len(train), batch_size):
            batch = order[start : start + batch_size]
            xb, yb = train.x[batch], train.y[batch]
            with torch.no_grad():
                teacher_logits = teacher(xb)
            loss = distillation_loss(student(xb), teacher_logits, yb, temperature, alpha)
            if not torch.isfinite(loss):
                raise TrialError("fine-tune", f"loss became {loss.item()} (lr={lr:g})")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return student.eval()
