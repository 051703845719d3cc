"""Fine-tuning with distillation from the unpruned fp32 teacher.

Three kinds of knowledge, each one choice of the search space:

- ``response`` (Hinton et al. 2015): softened logits, temperature and alpha.
- ``feature`` (FitNets, Romero et al. 2015): an MSE hint loss between the
  student's and the teacher's intermediate features at the last three stages
  of the network, through a 1x1 adapter where pruning left the student with
  fewer channels. Adapters are trained with the student and thrown away.
- ``relation`` (RKD, Park et al. 2019): the pairwise distances and angles
  between the samples' penultimate embeddings (the input of the output layer: a
  classifier's Linear, or a dense head's final convolution) should match the
  teacher's.

The feature and relation losses are added to the response loss with weight
``loss_weight``. Training hooks (sparsity masks, fake quantization) are called
after each backward pass and each optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from search._base.devices import autocast, grad_scaler, train_device
from search._base.errors import TrialError
from search._base.names import DISTILL_LOSSES
from search.tasks import Loss, Split, class_dim, classification_loss, logits_of
from search.trial.compress._layers import CONV
from search.trial.compress.prune import output_layer

__all__ = ["LOGITS", "TrainingHook", "distill", "distillation_loss", "feature_taps",
           "relation_loss", "teacher_outputs"]

LOGITS = "<logits>"  # the teacher's outputs in teacher_outputs (no module is named so)


class TrainingHook(Protocol):
    """Something that acts during a fine-tune (a sparsity mask, fake quantization)."""

    def on_backward(self) -> None: ...

    def on_step(self, progress: float) -> None: ...


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, temperature: float, alpha: float,
                      task_loss: Loss | None = None) -> torch.Tensor:
    """``alpha`` * T^2 * KL(teacher_T || student_T) + (1 - ``alpha``) * cross-entropy.

    With a ``task_loss`` (a task that is not classification, e.g. regression) the hard
    term is that loss and the soft term the mean squared error to the teacher's outputs
    (softened class probabilities have no meaning there; the temperature is unused)."""
    hard = (task_loss or classification_loss)(student_logits, labels)
    if alpha <= 0:
        return hard
    if task_loss is not None:
        return alpha * F.mse_loss(student_logits, teacher_logits) + (1 - alpha) * hard
    t = temperature
    dim = class_dim(student_logits, labels)
    # KL per label (per sample, pixel or token), as the cross-entropy is a mean per label
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=dim),
        F.log_softmax(teacher_logits / t, dim=dim),
        reduction="sum",
        log_target=True,
    ) * (t * t) / max(1, labels.numel())
    return alpha * soft + (1 - alpha) * hard


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD: distance-wise plus twice the angle-wise relation loss (Park et al. 2019)."""
    s, t = student.flatten(1), teacher.flatten(1)

    def distances(e: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(e, e)
        return d / d[d > 0].mean().clamp_min(1e-8)

    def angles(e: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    with torch.no_grad():
        td, ta = distances(t), angles(t)
    return F.smooth_l1_loss(distances(s), td) + 2.0 * F.smooth_l1_loss(angles(s), ta)


def _tensor_of(out: object) -> torch.Tensor | None:
    """A module's output as a tensor: itself, or a recurrent layer's output sequence (the
    first of the ``(output, h_n)`` / ``(output, (h_n, c_n))`` it returns)."""
    if isinstance(out, tuple | list) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def feature_taps(model: nn.Module, example: torch.Tensor, count: int = 3) -> list[str]:
    """The last ``count`` top-level stages whose output is a feature map or a sequence (a
    recurrent layer's hidden states included): what feature distillation compares."""
    outputs: dict[str, bool] = {}

    def is_feature(out: object) -> bool:
        tensor = _tensor_of(out)
        return tensor is not None and tensor.dim() >= 3

    hooks = [child.register_forward_hook(
        lambda mod, args, out, name=name: outputs.__setitem__(name, is_feature(out)))
        for name, child in model.named_children()]
    with torch.no_grad():
        model.eval()(example)
    for h in hooks:
        h.remove()
    return [name for name, ok in outputs.items() if ok][-count:]


class _Capture:
    """Forward hooks that keep the outputs (or inputs) of named modules."""

    def __init__(self, model: nn.Module, names: Sequence[str], inputs: bool = False) -> None:
        modules = dict(model.named_modules())
        self.values: dict[str, torch.Tensor] = {}
        if inputs:
            self.hooks = [modules[n].register_forward_pre_hook(
                lambda mod, args, n=n: self.values.__setitem__(n, args[0])) for n in names]
        else:
            self.hooks = [modules[n].register_forward_hook(
                lambda mod, args, out, n=n: self.values.__setitem__(n, _tensor_of(out)))
                for n in names]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _adapter(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
    """Maps the student's pruned width to the teacher's: a 1x1 convolution over channels
    for (N, C, ...) feature maps of 1, 2 or 3 spatial dimensions, a Linear over the last
    axis for token sequences (N, L, D)."""
    if student.shape[1:] == teacher.shape[1:]:
        return nn.Identity()
    if 3 <= student.dim() <= 5 and student.shape[2:] == teacher.shape[2:]:
        return CONV[student.dim() - 3](student.shape[1], teacher.shape[1], 1, bias=False)
    return nn.Linear(student.shape[-1], teacher.shape[-1], bias=False)


def _hint(adapters: nn.ModuleDict, s: dict[str, torch.Tensor],
          t: dict[str, torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(())
    for name, ft in t.items():
        ft = ft.detach()
        total = total + F.mse_loss(adapters[name.replace(".", "_")](s[name]), ft) \
            / ft.pow(2).mean().clamp_min(1e-8)
    return total / max(len(t), 1)


def _teacher_taps(loss: str, teacher: nn.Module, probe: torch.Tensor) -> tuple[list[str], bool]:
    """The teacher's modules whose outputs (inputs, when the bool says so) ``loss`` compares
    with the student's: none for response distillation."""
    if loss == "feature":
        taps = feature_taps(teacher, probe)
        if not taps:
            raise TrialError("fine-tune", "feature distillation needs a stage whose output is a "
                             "feature map or a sequence, and this model has none")
        return taps, False
    if loss == "relation":
        head = output_layer(teacher, probe[:1])
        if head is None:
            raise TrialError("fine-tune", "relation distillation needs a final Conv or "
                             "Linear layer (its input is the embedding it compares)")
        return [head], True
    return [], False


class _Auxiliary:
    """The feature or relation term of a distillation loss: activations captured from both
    models on every forward pass, and for features the adapters matching their widths."""

    def __init__(self, loss: str, student: nn.Module, teacher: nn.Module, probe: torch.Tensor,
                 device: torch.device) -> None:
        self.loss = loss
        self.adapters = nn.ModuleDict()
        self.caps: tuple[_Capture, _Capture] | None = None
        self.taps, inputs = _teacher_taps(loss, teacher, probe)
        if self.taps:
            self.caps = (_Capture(student, self.taps, inputs),
                         _Capture(teacher, self.taps, inputs))
        if loss == "feature":
            with torch.no_grad():
                student.eval()(probe)
                teacher(probe)
            s, t = self.caps
            for name in self.taps:
                self.adapters[name.replace(".", "_")] = _adapter(s.values[name], t.values[name])
            self.adapters.to(device)

    def teacher_ran(self, values: dict[str, torch.Tensor]) -> None:
        """Set what the teacher's taps would have captured on this batch (kept outputs)."""
        if self.caps is not None:
            self.caps[1].values.update(values)

    def term(self) -> torch.Tensor:
        """The term for the batch both models last ran."""
        assert self.caps is not None
        s, t = self.caps
        if self.loss == "feature":
            return _hint(self.adapters, s.values, t.values)
        (name,) = t.values
        return relation_loss(s.values[name].float(), t.values[name].float())

    def close(self) -> None:
        for cap in self.caps or ():
            cap.close()


def teacher_outputs(teacher: nn.Module, x: torch.Tensor, max_bytes: float,
                    loss: str = "response", batch_size: int = 256) -> dict[str, torch.Tensor] | None:
    """What distilling from ``teacher`` with ``loss`` reads of it on each input of ``x``: its
    outputs (key ``LOGITS``) and, for feature or relation distillation, the activations that
    loss compares (keyed by module name). In fp32 on the CPU, computed where training runs;
    None when they would take more than ``max_bytes`` (say, a big model's feature maps).

    In eval mode the teacher's values for one input do not depend on the others in its
    batch, so a fine-tune can index these instead of running the teacher on every batch of
    every epoch: three epochs of a half-width digits ResNet student took 5.5 s instead of 10.6.
    """
    device = train_device()
    teacher.to(device).eval()
    taps, inputs = _teacher_taps(loss, teacher, x[:2].to(device))
    cap = _Capture(teacher, taps, inputs)
    parts: list[dict[str, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                out = logits_of(teacher(x[start : start + batch_size].to(device)))
                part = {LOGITS: out, **{n: cap.values[n] for n in taps}}
                parts.append({k: v.detach().float().cpu() for k, v in part.items()})
                if not start and sum(v.numel() for v in parts[0].values()) * 4 * len(x) \
                        > max_bytes * len(out):
                    return None
    finally:
        cap.close()
        teacher.cpu()
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def distill(student: nn.Module, teacher: nn.Module, train: Split, *, epochs: int, lr: float,
            temperature: float, alpha: float, seed: int, batch_size: int = 64,
            loss: str = "response", loss_weight: float = 1.0,
            task_loss: Loss | None = None, hooks: Sequence[TrainingHook] = (),
            history: dict[str, list[float]] | None = None,
            after_epoch: Callable[[int, nn.Module], bool] | None = None,
            teacher_values: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Fine-tune ``student`` in place; zero epochs returns it untouched (one-shot).

    ``task_loss``: the task's loss when it is not classification (see
    :func:`distillation_loss`). ``history``, when given, receives each epoch's mean
    ``response`` loss and, for feature or relation distillation, the mean of that term.
    ``after_epoch(epoch, student)`` is called after every epoch but the last
    (the student on the CPU, in eval mode); returning True stops the fine-tune
    there (a multi-fidelity search stops what cannot reach the front).
    ``teacher_values``: what :func:`teacher_outputs` kept of the teacher on ``train.x``
    for this ``loss`` (row i for input i); the teacher then never runs in the loop.

    (Long: one training loop kept whole, because its order (autocast, loss scaling,
    unscale, hooks after backward and after each step, schedule) is what the sparsity
    masks and QAT hooks rely on.)
    """
    if epochs <= 0:
        return student.eval()
    if loss not in DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r}; known: {', '.join(DISTILL_LOSSES)}")
    torch.manual_seed(seed)
    device = train_device()  # CUDA with mixed precision when present; the model returns on CPU
    student.to(device)
    teacher.to(device).eval()
    aux = _Auxiliary(loss, student, teacher, train.x[:2].to(device), device)
    known = teacher_values if teacher_values is not None \
        and {LOGITS, *aux.taps} <= set(teacher_values) else None
    opt = torch.optim.AdamW(list(student.parameters()) + list(aux.adapters.parameters()),
                            lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    scaler = grad_scaler(device)
    step = 0
    try:
        for epoch in range(epochs):
            student.train()
            order = torch.randperm(len(train))
            sums = {"response": 0.0, loss: 0.0}
            batches = 0
            for start in range(0, len(train), batch_size):
                batch = order[start : start + batch_size]
                xb, yb = train.x[batch].to(device), train.y[batch].to(device)
                with autocast(device):
                    with torch.no_grad():
                        if known is None:
                            teacher_logits = logits_of(teacher(xb))
                        else:
                            teacher_logits = known[LOGITS][batch].to(device)
                            aux.teacher_ran({n: known[n][batch].to(device) for n in aux.taps})
                    value = distillation_loss(logits_of(student(xb)), teacher_logits, yb,
                                              temperature, alpha, task_loss)
                    sums["response"] += float(value.detach())
                    if loss != "response":
                        extra = aux.term()
                        sums[loss] += float(extra.detach())
                        value = value + loss_weight * extra
                batches += 1
                if not torch.isfinite(value):
                    raise TrialError("fine-tune", f"loss became {value.item()} (lr={lr:g})")
                opt.zero_grad()
                scaler.scale(value).backward()
                scaler.unscale_(opt)
                for hook in hooks:
                    hook.on_backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                for hook in hooks:
                    hook.on_step(step / steps)
            if history is not None:
                for key, total in sums.items():
                    history.setdefault(key, []).append(total / max(batches, 1))
            if after_epoch is not None and epoch < epochs - 1:
                student.cpu().eval()
                stop = after_epoch(epoch, student)
                student.to(device)
                if stop:
                    break
    finally:
        aux.close()
        student.cpu()
        teacher.cpu()
    return student.eval()
