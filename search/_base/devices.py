"""Where training runs: CUDA (with mixed precision) when present, else the CPU.

Only training uses this; scoring and latency always run the exported ONNX
model in ONNX Runtime. ``SEARCH_TRAIN_DEVICE=cpu`` (or ``cuda``, ``cuda:1``)
overrides the choice, e.g. to compare the two on one machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from search._base.errors import ConfigError

__all__ = ["autocast", "grad_scaler", "train_device"]

_ENV = "SEARCH_TRAIN_DEVICE"


def train_device() -> torch.device:
    """``$SEARCH_TRAIN_DEVICE`` if set, else the first CUDA device when one is usable, else the CPU."""
    wanted = os.environ.get(_ENV, "").strip()
    if wanted:
        try:
            device = torch.device(wanted)
        except RuntimeError:
            raise ConfigError(f"{_ENV}={wanted!r} is not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{_ENV}={wanted!r} but CUDA is not available here; use cpu")
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"{_ENV}={wanted!r}: only cpu and cuda are supported")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it (no loss scaling needed), else fp16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """Mixed precision on CUDA; nothing on the CPU (CPU autocast is slower for small convnets)."""
    if device.type != "cuda":
        yield
        return
    with torch.autocast(device_type="cuda", dtype=_amp_dtype(device)):
        yield


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled only where autocast uses fp16 (a no-op otherwise)."""
    enabled = device.type == "cuda" and _amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda", enabled=enabled)
