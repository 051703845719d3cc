"""Preflight: a technique that breaks on the model is removed before trial 0, with its reason."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch
from torch import nn

from search.profiles import load_profile
from search.space.resolve import resolve_space
from search.space.schema import load_space
from search.study.preflight import preflight
from search.study.sampling import sample
from search.tasks import Split, Task
from search.trial.pipeline import model_facts, student_layers
from tests.families import EncoderClassifier, SeriesClassifier


class HardcodedWidth(nn.Module):
    """Reshapes to a width its code hardcodes, which channel pruning cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).reshape(x.shape[0], 32, -1).mean(-1))


def _task(build) -> Task:  # noqa: ANN001
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randn(n, 3, 32, 32, generator=gen),
                     torch.randint(0, 10, (n,), generator=gen))

    return Task(name=build.__name__, make_model=build, teacher_state=build().state_dict(),
                train=split(64), val=split(32), test=split(32), input_shape=(3, 32, 32),
                num_classes=10)


def _resolved(task: Task):
    profile = load_profile("cpu-avx512-vnni")
    space = resolve_space(load_space("default"), profile, student_layers(task), model_facts(task))
    return profile, space


def test_a_technique_that_breaks_is_removed_with_its_reason():
    task = _task(HardcodedWidth)
    profile, resolved = _resolved(task)
    narrowed, removed, notes = preflight(task, profile, resolved)
    assert notes == [
        "layer dropping is not offered for this model: no residual block keeps its input's "
        "shape (nothing to drop to)",
        "head pruning is not offered for this model: no multi-head attention"]
    assert len(removed) == 1 and removed[0].startswith("structured pruning is not offered")
    assert "no longer runs after channel pruning" in removed[0]
    assert narrowed.space.pruning.structured_ratio.high == 0.0
    assert narrowed.modes == resolved.modes  # the rest stays
    study = optuna.create_study(directions=["maximize", "minimize"])
    assert all(sample(narrowed, study.ask()).structured_ratio == 0.0 for _ in range(5))


def test_a_transformer_encoder_keeps_every_technique():
    task = _task(EncoderClassifier)
    profile, resolved = _resolved(task)
    assert resolved.facts.attention and resolved.facts.droppable_blocks == 2
    narrowed, removed, notes = preflight(task, profile, resolved)
    assert removed == [] and notes == [] and narrowed == resolved


def test_a_resumed_study_reuses_what_its_preflight_found():
    """The outcomes of the first run are kept: nothing is tried again, so the space a study
    resumes with is the one it started with, even if a retry would now go otherwise."""
    task = _task(HardcodedWidth)
    profile, resolved = _resolved(task)
    outcomes: dict[str, str] = {}
    narrowed, removed, _ = preflight(task, profile, resolved, outcomes)
    assert outcomes["structured pruning"] and outcomes["static int8"] == ""
    recorded = {**outcomes, "static int8": "RuntimeError: as it failed in the first run"}
    again, removed_again, _ = preflight(task, profile, resolved, dict(recorded))
    assert "static int8 is not offered for this model: RuntimeError: as it failed in the " \
           "first run" in removed_again
    assert "int8" not in {p for v in again.layer_precisions.values() for p in v}
    assert again.space.pruning.structured_ratio.high == 0.0


@pytest.fixture
def tried(monkeypatch, tmp_path) -> list[str]:
    """The settings preflight really tries (repr of each), in a process that has tried
    nothing yet and with a cache directory of its own (nothing noted by earlier tests)."""
    from search.study import preflight as probe

    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path))
    seen: list[str] = []
    real = probe._try

    def counted(task, profile, choices):  # noqa: ANN001, ANN202
        seen.append(repr(choices))
        return real(task, profile, choices)

    monkeypatch.setattr(probe, "_try", counted)
    monkeypatch.setattr(probe, "_TRIED", {})
    return seen


def test_a_second_study_of_the_same_model_in_one_process_tries_nothing_again(tried):
    """Tried once per model and setting in a process (a notebook's studies); other weights
    of the same architecture are tried afresh, with the same outcomes."""
    task = _task(HardcodedWidth)
    profile, resolved = _resolved(task)
    first = preflight(task, profile, resolved)
    n = len(tried)
    assert n >= 2
    assert preflight(task, profile, resolved) == first and len(tried) == n
    torch.manual_seed(1)
    other = dataclasses.replace(task, teacher_state=HardcodedWidth().state_dict())
    assert preflight(other, profile, resolved)[1:] == first[1:] and len(tried) == 2 * n
    wider = profile.model_copy(update={"channel_multiple": 2 * profile.channel_multiple})
    preflight(task, wider, resolved)  # channels are rounded to the profile's multiple
    assert len(tried) == 3 * n


def test_a_new_process_tries_again_only_what_failed(tried, monkeypatch, tmp_path):
    """What passed is noted in the cache directory for the next process (a new study of the
    command line); a failure is tried again, since it may be the machine's."""
    from search.study import preflight as probe

    task = _task(HardcodedWidth)
    profile, resolved = _resolved(task)
    first = preflight(task, profile, resolved)
    assert len(tried) >= 2 and len(list((tmp_path / "preflight").iterdir())) == len(tried) - 1
    monkeypatch.setattr(probe, "_TRIED", {})  # a new process
    again = preflight(task, profile, resolved)
    assert again == first
    assert len(tried) == len(set(tried)) + 1 and "structured_ratio=0.7" in tried[-1]


def _series(cell: type[nn.Module]) -> Task:
    """A 2-layer LSTM or GRU classifier (``tests.families.SeriesClassifier``) on random series."""
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randn(n, 32, 3, generator=gen), torch.randint(0, 4, (n,), generator=gen))

    def build() -> nn.Module:
        return SeriesClassifier(cell)

    return Task(name=cell.__name__, make_model=build, teacher_state=build().state_dict(),
                train=split(64), val=split(32), test=split(32), input_shape=(32, 3),
                num_classes=4)


def test_weights_no_technique_reaches_are_named_with_their_share():
    """Recurrent layers that get no precision are named with their share of the weights, so
    a user does not wonder why the front stops at the speed of one Linear: an LSTM or a GRU
    on a GPU profile, an ``nn.RNN`` anywhere (their hidden width is still pruned). On a CPU
    profile an LSTM or a GRU gets int8 (a GRU's unrolled into MatMuls), and no note."""
    for cell in (nn.GRU, nn.LSTM):
        task = _series(cell)
        profile, resolved = _resolved(task)
        assert resolved.layer_precisions["rnn"] == ("fp32", "int8")
        assert not any(cell.__name__ in n for n in preflight(task, profile, resolved)[2])
        gpu = load_profile("t4-gpu")
        on_gpu = resolve_space(load_space("default"), gpu, student_layers(task), model_facts(task))
        assert on_gpu.layer_precisions["rnn"] == ("fp32",)
        assert any(n.startswith(f"{cell.__name__} layers (rnn; 99% of the parameters) get no "
                                "precision here (their hidden width is pruned)")
                   for n in preflight(task, gpu, on_gpu)[2])
    task = _series(nn.RNN)
    profile, resolved = _resolved(task)
    assert any(n.startswith("RNN layers (rnn; 97% of the parameters) get no precision here")
               for n in preflight(task, profile, resolved)[2])
