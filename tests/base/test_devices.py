"""Training device selection and mixed precision (CPU here; CUDA when present)."""

from __future__ import annotations

import pytest
import torch

from search._base.devices import autocast, grad_scaler, train_device
from search._base.errors import ConfigError


def test_cpu_without_cuda_and_the_override(monkeypatch):
    monkeypatch.delenv("SEARCH_TRAIN_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert train_device().type == expected
    monkeypatch.setenv("SEARCH_TRAIN_DEVICE", "cpu")
    assert train_device() == torch.device("cpu")


@pytest.mark.parametrize("value, words", [("gpu0", "is not a device"),
                                          ("meta", "only cpu and cuda")])
def test_bad_overrides_are_refused(monkeypatch, value, words):
    """Refused with or without CUDA."""
    monkeypatch.setenv("SEARCH_TRAIN_DEVICE", value)
    with pytest.raises(ConfigError, match=words):
        train_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")
def test_cuda_override_is_refused_without_cuda(monkeypatch):
    monkeypatch.setenv("SEARCH_TRAIN_DEVICE", "cuda")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train_device()


def test_autocast_is_a_no_op_on_the_cpu():
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 2)
    with autocast(cpu):
        out = layer(torch.ones(1, 4))
    assert out.dtype == torch.float32
    assert not grad_scaler(cpu).is_enabled()
