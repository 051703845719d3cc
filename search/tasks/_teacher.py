"""Teachers: train one (cached by content hash) or load a user's checkpoint.

Built-in tasks share this code: the cache key is a hash of everything that
decides the weights (data digest, architecture, training settings, seed, torch
version), so a changed recipe never reuses a stale teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from search._base.devices import autocast, grad_scaler, train_device
from search._base.errors import ConfigError
from search._base.paths import cache_dir, write_atomic
from search.tasks._base import Loss, Split, Task, classification_loss, logits_of

__all__ = ["TEACHER_SEED", "TrainSettings", "cached_teacher", "load_teacher_state", "near_chance",
           "read_teacher", "resolve_teacher", "teacher_scores", "train_classifier"]

log = logging.getLogger("search")
# A built-in task's teacher stands for the user's trained model: one per task and recipe,
# whatever the study's --seed (which varies the search), so a seed sweep never retrains it.
TEACHER_SEED = 0
_SHOWN = 12  # keys listed per kind of mismatch
_WARNED: set[Path] = set()  # pickled checkpoints already warned about


@dataclass(frozen=True)
class TrainSettings:
    """A plain supervised recipe: AdamW with a one-cycle schedule, random shifts as augmentation."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    shift: int = 2  # pixels along the spatial axes; 0 disables; inputs without any (token ids) keep still

    def as_dict(self) -> dict[str, float | int]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "shift": self.shift}


def train_classifier(make_model: Callable[[], nn.Module], train: Split, settings: TrainSettings,
                     seed: int, loss: Loss | None = None) -> nn.Module:
    """Build (after seeding) and train a model on :func:`search._base.devices.train_device`;
    returns it on the CPU in eval mode. ``loss(output, y)``: the task's loss when it is not
    classification (cross-entropy over the classes' axis when None), e.g. regression.

    On the CPU this is bit-for-bit the loop the digits teacher has always used,
    so existing cached teachers stay valid.
    """
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    model = make_model()
    device = train_device()
    model.to(device)
    s = settings
    steps = max(1, s.epochs * math.ceil(len(train) / s.batch_size))
    opt = torch.optim.AdamW(model.parameters(), s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s.lr, total_steps=steps)
    scaler = grad_scaler(device)
    x_all, y_all = train.x.to(device), train.y.to(device)
    loss_of = loss or classification_loss
    for _ in range(s.epochs):
        model.train()
        order = torch.randperm(len(train))
        for start in range(0, len(train), s.batch_size):
            batch = order[start : start + s.batch_size].to(device)
            shift = gen.integers(-s.shift, s.shift + 1, size=2)
            xb = _shifted(x_all[batch], shift) if s.shift else x_all[batch]
            with autocast(device):
                value = loss_of(logits_of(model(xb)), y_all[batch])
            opt.zero_grad()
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
    return model.cpu().eval()


def _shifted(x: torch.Tensor, shift: np.ndarray) -> torch.Tensor:
    """``x`` rolled by ``shift`` along its spatial axes (images: the last two; signals
    ``(N, C, L)``: the last); inputs without them (features, token ids) are left alone."""
    dims = tuple(range(2, x.dim()))[-2:]
    if not dims:
        return x
    return torch.roll(x, shifts=tuple(int(v) for v in shift[-len(dims):]), dims=dims)


def _cache_key(key: Mapping[str, Any]) -> str:
    text = json.dumps({**key, "torch": torch.__version__.split("+")[0]}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_teacher(name: str, key: Mapping[str, Any],
                   train: Callable[[], nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state of the teacher ``train()`` would produce, trained at most once per ``key``.

    Cached as ``<cache dir>/<name>-teacher-<hash of key>.pt``; returns the state
    and an info dict (``cache`` path, ``trained_s``: 0 when it came from the cache).
    Processes asking for the same teacher at once (Ray workers, two studies) train
    it once: the others wait on a lock next to the file and read what it wrote.
    """
    path = cache_dir() / f"{name}-teacher-{_cache_key(key)}.pt"
    info: dict[str, Any] = {"cache": str(path), "trained_s": 0.0}
    state = _read_cached(path)
    if state is not None:
        return state, info
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        state = _read_cached(path)  # trained by another process while this one waited
        if state is not None:
            return state, info
        log.info("training the %s teacher on %s (first use; cached in %s)", name, train_device(),
                 path.parent)
        start = time.perf_counter()
        state = train().state_dict()
        info["trained_s"] = time.perf_counter() - start
        _save_atomic(state, path)
    return state, info


def _read_cached(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached state, or None when there is none (or only an unreadable one: train again)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file from before writes were atomic
        log.warning("cached teacher %s is unreadable (%s); training it again", path,
                    type(exc).__name__)
        return None


def _save_atomic(state: Mapping[str, torch.Tensor], path: Path) -> None:
    write_atomic(path, lambda handle: torch.save(dict(state), handle))


def _read_checkpoint(path: Path) -> Any:
    """torch.load with ``weights_only`` first; a pickled module needs the full unpickler."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # junk, not a module the safe loader refuses
            detail = str(exc).rsplit("WeightsUnpickler error:", 1)[-1].split("\n\n")[0].strip()
            raise ConfigError(f"teacher {path} is not a readable PyTorch checkpoint "
                              f"({detail[:200]})") from None
    except Exception as exc:  # zip errors, truncated files, ...
        raise ConfigError(f"teacher {path} is not a readable PyTorch checkpoint "
                          f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if path not in _WARNED:
        _WARNED.add(path)
        log.warning("teacher %s holds pickled objects, not just tensors: loading it runs code from "
                    "the file (only do this with files you trust; save a state_dict to avoid it)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # e.g. the model's class cannot be imported here
        raise ConfigError(f"teacher {path} cannot be unpickled ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); save model.state_dict() instead") from None


def _state_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a module, a state dict, or a training checkpoint holding one."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if isinstance(inner, Mapping):
                obj = inner
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = dict(obj)
            if all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
                state = {k[len("module."):]: v for k, v in state.items()}
            return state
    raise ConfigError(
        f"teacher {path} holds a {type(obj).__name__}; expected a state_dict (name -> tensor), "
        "an nn.Module, or a checkpoint dict with a 'state_dict' / 'model_state_dict' / 'model' entry"
    )


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def read_teacher(path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path``; ConfigError when it is missing or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"teacher {path} does not exist (--teacher takes a file written by "
                          "torch.save: a state_dict or a whole model)")
    return _state_of(_read_checkpoint(path), path)


def _mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                ) -> list[str]:
    """Why ``state`` does not load into a model whose state is ``expected`` (none: it does)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})"
                    for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    parts = []
    if missing:
        parts.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listed(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {_listed(shapes)}")
    return parts


def load_teacher_state(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights in ``path``, checked against ``model``; ConfigError naming every mismatch."""
    path = Path(path)
    state = read_teacher(path)
    parts = _mismatches(state, model.state_dict())
    if parts:
        raise ConfigError(f"teacher {path} does not fit the task's model "
                          f"({type(model).__name__}): " + "; ".join(parts))
    model.load_state_dict(state)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def resolve_teacher(name: str, make_model: Callable[[], nn.Module], teacher: Path | None,
                    key: Mapping[str, Any], train: Callable[[], nn.Module],
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The user's checkpoint when ``teacher`` is given, else the cached/trained built-in one.

    A cached state that no longer fits ``make_model()`` (the model's construction changed
    under the same key, as VGG's pooling on small images did) is trained again."""
    if teacher is not None:
        return load_teacher_state(teacher, make_model()), {"teacher": str(teacher), "trained_s": 0.0}
    state, info = cached_teacher(name, key, train)
    stale = _mismatches(state, make_model().state_dict())
    if stale:
        log.warning("cached teacher %s does not fit the model built now (%s); training it "
                    "again", info["cache"], "; ".join(stale))
        Path(info["cache"]).unlink(missing_ok=True)
        state, info = cached_teacher(name, key, train)
    return state, info


def near_chance(accuracy: float, num_classes: int) -> str:
    """Why a teacher at top-1 ``accuracy`` (%) learned next to nothing, or "" when it did.

    Near chance: less than a tenth of the way from chance (100 / classes) to
    100 %; a short recipe can end there (EfficientNet-B0, 2 epochs on the
    digits: 10.00 %), and compressing such a teacher only wastes the study.
    """
    chance = 100.0 / max(1, num_classes)
    if accuracy >= chance + 0.1 * (100.0 - chance):
        return ""
    return (f"the teacher's test accuracy {accuracy:.2f}% is near chance ({chance:.2f}% for "
            f"{num_classes} classes): it learned next to nothing, so the study compresses a "
            "model that does not work; train it longer (--teacher-epochs) or bring trained "
            "weights (--teacher)")


def teacher_scores(task: Task) -> dict[str, float]:
    """The teacher's ``test_accuracy`` and ``val_accuracy`` (in the task's metric).

    A cached built-in teacher keeps them in a file next to its weights, keyed by
    the metric and a digest of the validation and test data, so a study that
    resumes or a second study on the same task does not score it again (seconds
    on a small model, minutes on a large one).
    """
    cache = task.teacher_info.get("cache")
    path = Path(f"{cache}.scores.json") if cache else None
    # version 2: top-1 accuracy counts every label of dense outputs (it divided by samples)
    digest = hashlib.sha256(b"2" + repr(getattr(task.metric, "__qualname__",
                                               task.metric)).encode())
    if cache:  # the weights file itself: retrained after a loss, it is scored again
        try:
            stat = os.stat(cache)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        except OSError:
            path = None
    for split in (task.val, task.test):
        digest.update(split.x.numpy().tobytes())
        digest.update(split.y.numpy().tobytes())
    key = digest.hexdigest()
    if path is not None and path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                return {k: float(stored[k]) for k in ("test_accuracy", "val_accuracy")}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: score again and write it anew
    teacher = task.teacher()
    scores = {"test_accuracy": task.score(teacher, task.test),
              "val_accuracy": task.score(teacher, task.val)}
    if path is not None:
        text = json.dumps({"key": key, **scores}).encode()
        try:
            write_atomic(path, lambda handle: handle.write(text))
        except OSError as exc:  # a read-only cache still scores; it only does not remember
            log.debug("teacher scores not cached in %s: %s", path, exc)
    return scores
