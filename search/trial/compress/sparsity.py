"""Unstructured and semi-structured (N:M) sparsity with three weight criteria.

- ``magnitude`` (0th order): ``|w|``.
- ``movement`` (1st order, Sanh et al. 2020): ``-sum_t w * dL/dw`` accumulated
  over the fine-tune, with the sparsity raised on a cubic schedule while
  training; weights moving towards zero are removed. Without a fine-tune the
  score is one first-order pass over 512 training images (Taylor). On a
  teacher already trained on the task the weights barely move, the scores
  are mostly noise, and magnitude does better (the search finds that out);
  movement was made for transfer, where weights move far.
- ``fisher`` (2nd order, Optimal Brain Damage with the diagonal of the
  empirical Fisher, the diagonal case of WoodFisher): ``w^2 * mean(g^2) / 2``
  from mini-batch gradients. Only the diagonal: no off-diagonal correction of
  the remaining weights.

Masks are plain boolean tensors held here and re-applied after every optimiser
step, so a fine-tune keeps the zeros without re-parametrising the model and
the export never sees a mask. ``N:M`` (e.g. 2:4) keeps the ``N`` best of every
``M`` consecutive weights along the input channels, the layout sparse tensor
cores use; layers whose input width is not a multiple of ``M`` stay dense.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from search._base.names import SPARSITY_CRITERIA, SPARSITY_SCOPES
from search.tasks import Loss, Split, classification_loss, logits_of
from search.trial.compress._layers import WEIGHTED

__all__ = ["Sparsifier", "fisher_scores", "nm_mask", "one_shot_scores", "taylor_scores"]

_WARMUP = 0.25  # share of the fine-tune that only accumulates movement scores


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Conv/Linear weights by module name (the Parameter objects, which stay the same
    when fake-quantization later parametrizes the module)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED):
            params = getattr(module, "parametrizations", None)
            out[name] = params.weight.original if params is not None and "weight" in params \
                else module.weight
    return out


def _by_input_channel(w: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) -> (out, kh*kw, in): input channels innermost, as tensor cores read."""
    if w.dim() == 4:
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1, w.shape[1])
    return w.reshape(w.shape[0], 1, -1)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """Keep the ``n`` highest of every ``m`` consecutive input-channel scores; None when the
    layer's input width is not a multiple of ``m`` (it stays dense)."""
    grouped = _by_input_channel(scores)
    if grouped.shape[-1] % m:
        return None
    blocks = grouped.reshape(*grouped.shape[:-1], -1, m)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(-1, blocks.topk(n, dim=-1).indices, True)
    keep = keep.reshape(grouped.shape)
    if scores.dim() == 4:
        o, i, kh, kw = scores.shape
        return keep.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()
    return keep.reshape(scores.shape)


def _batches(split: Split, samples: int, batch: int, seed: int):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=gen)[:samples]
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        yield split.x[idx], split.y[idx]


def _gradient_pass(model: nn.Module, data: Split, samples: int, batch: int, seed: int,
                   accumulate: Callable[[str, torch.Tensor, torch.Tensor], None],
                   loss: Loss = classification_loss) -> int:
    """Gradients of ``loss`` (the task's; cross-entropy for a classifier) over ``samples``
    training inputs in eval mode, handing each batch's (name, weight, grad) to
    ``accumulate``; returns the number of batches."""
    weights = _weights(model)
    was_training = model.training
    model.eval()
    n = 0
    for xb, yb in _batches(data, samples, batch, seed):
        model.zero_grad(set_to_none=True)
        loss(logits_of(model(xb)), yb).backward()
        for name, w in weights.items():
            if w.grad is not None:
                accumulate(name, w.detach(), w.grad.detach())
        n += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return n


def fisher_scores(model: nn.Module, data: Split, *, samples: int = 512, batch: int = 16,
                  seed: int = 0, loss: Loss = classification_loss) -> dict[str, torch.Tensor]:
    """OBD saliency ``w^2 * F_ii / 2`` with the empirical Fisher's diagonal from mini-batches."""
    weights = _weights(model)
    fisher = {name: torch.zeros_like(w) for name, w in weights.items()}
    n = _gradient_pass(model, data, samples, batch, seed,
                       lambda name, w, g: fisher[name].add_(g**2), loss)
    return {name: w.detach() ** 2 * fisher[name] / (2 * max(n, 1)) for name, w in weights.items()}


def taylor_scores(model: nn.Module, data: Split, *, samples: int = 512, batch: int = 64,
                  seed: int = 0, loss: Loss = classification_loss) -> dict[str, torch.Tensor]:
    """First-order ``-w * dL/dw`` summed over one pass: movement pruning without a fine-tune."""
    scores = {name: torch.zeros_like(w) for name, w in _weights(model).items()}
    _gradient_pass(model, data, samples, batch, seed,
                   lambda name, w, g: scores[name].sub_(w * g), loss)
    return scores


def one_shot_scores(model: nn.Module, criterion: str, data: Split | None, seed: int = 0,
                    loss: Loss = classification_loss) -> dict[str, torch.Tensor] | None:
    """Scores to prune by now: the diagonal Fisher for ``fisher``, first-order movement
    (Taylor) for ``movement`` without a fine-tune, None for ``magnitude`` (the
    Sparsifier's own ``|w|``, and the fallback without data)."""
    if criterion not in SPARSITY_CRITERIA:
        raise ValueError(f"unknown sparsity criterion {criterion!r}; known: {SPARSITY_CRITERIA}")
    if data is None or criterion == "magnitude":
        return None
    if criterion == "fisher":
        return fisher_scores(model, data, seed=seed, loss=loss)
    return taylor_scores(model, data, seed=seed, loss=loss)


class Sparsifier:
    """Chooses, applies and keeps the zero masks of one model's Conv/Linear weights.

    It is also a training hook: :func:`search.trial.compress.distill` calls
    :meth:`on_backward` after each backward pass (movement scores) and
    :meth:`on_step` after each optimiser step (re-apply masks; raise the
    sparsity on the movement schedule).
    """

    def __init__(self, model: nn.Module, *, sparsity: float = 0.0, criterion: str = "magnitude",
                 scope: str = "global", pattern: str = "unstructured") -> None:
        if criterion not in SPARSITY_CRITERIA:
            raise ValueError(f"unknown sparsity criterion {criterion!r}; "
                             f"known: {SPARSITY_CRITERIA}")
        if scope not in SPARSITY_SCOPES:
            raise ValueError(f"unknown sparsity scope {scope!r}; known: {SPARSITY_SCOPES}")
        self.sparsity, self.criterion, self.scope, self.pattern = sparsity, criterion, scope, pattern
        self.weights = _weights(model)
        self.masks: dict[str, torch.Tensor] = {}
        self.movement: dict[str, torch.Tensor] | None = None
        self._next_update = 0.0

    @property
    def active(self) -> bool:
        return self.pattern != "unstructured" or self.sparsity > 0 or bool(self.masks)

    @classmethod
    def from_zeros(cls, model: nn.Module) -> Sparsifier:
        """Keep the zeros a pre-sparsified checkpoint already has (sparse transfer)."""
        self = cls(model)
        self.masks = {name: w.detach() != 0 for name, w in self.weights.items()
                      if bool((w == 0).any())}
        return self

    def start(self, scores: dict[str, torch.Tensor] | None, gradual: bool) -> None:
        """Prune now from ``scores`` (default: magnitude), or, when ``gradual`` (movement with
        a fine-tune), start accumulating movement and prune on the schedule."""
        if not self.active or self.masks:
            return
        if gradual:
            self.movement = {name: torch.zeros_like(w) for name, w in self.weights.items()}
            return
        self.prune(scores or {name: w.detach().abs() for name, w in self.weights.items()},
                   self.sparsity)

    def prune(self, scores: dict[str, torch.Tensor], sparsity: float) -> None:
        """Set the masks from ``scores`` (higher = keep) and zero the weights."""
        if self.pattern != "unstructured":
            n, m = (int(v) for v in self.pattern.split(":"))
            masks = {name: nm_mask(s, n, m) for name, s in scores.items()}
            self.masks = {name: mask for name, mask in masks.items() if mask is not None}
        elif sparsity > 0:
            self.masks = self._threshold(scores, sparsity)
        self.apply()

    def _threshold(self, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
        if self.scope == "layer":
            out = {}
            for name, s in scores.items():
                k = int(sparsity * s.numel())
                if k < 1:
                    continue
                cut = s.flatten().kthvalue(k).values
                out[name] = s > cut
            return out
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = int(sparsity * flat.numel())
        if k < 1:
            return {}
        cut = flat.kthvalue(k).values
        return {name: s > cut for name, s in scores.items()}

    @torch.no_grad()
    def apply(self) -> None:
        for name, mask in self.masks.items():
            w = self.weights[name]
            if mask.device != w.device:  # the fine-tune may run on a GPU
                mask = self.masks[name] = mask.to(w.device)
            w.mul_(mask)

    def on_backward(self) -> None:
        if self.movement is None:
            return
        for name, w in self.weights.items():
            if w.grad is not None:
                if self.movement[name].device != w.device:
                    self.movement[name] = self.movement[name].to(w.device)
                self.movement[name] -= w.detach() * w.grad.detach()

    def on_step(self, progress: float) -> None:
        """After an optimiser step at ``progress`` in (0, 1] of the fine-tune."""
        if self.movement is not None and progress >= max(self._next_update, _WARMUP):
            # scores only accumulate during the warm-up; then the cubic schedule of Zhu &
            # Gupta (2017) prunes fast early and slowly near the end
            t = min((progress - _WARMUP) / (1 - _WARMUP), 1.0)
            self.prune(self.movement, self.sparsity * (1 - (1 - t) ** 3))
            self._next_update = progress + 0.1
        self.apply()

    def finish(self) -> None:
        """End of the fine-tune: movement reaches its full target; masks are baked in."""
        if self.movement is not None:
            self.prune(self.movement, self.sparsity)
            self.movement = None
        self.apply()
        self.masks = {name: mask.cpu() for name, mask in self.masks.items()}
