"""A technique the space offers changes the model as it claims; one that cannot is not
offered (with its reason), on models written without torchvision's idioms."""

from __future__ import annotations

import torch
from torch import nn

from search.profiles import load_profile
from search.space.resolve import resolve_space
from search.space.schema import load_space
from search.tasks import Split, Task
from search.trial.compress.distill import distill, feature_taps
from search.trial.compress.prune import prune_structured
from search.trial.pipeline import model_facts, student_layers


class PlainMLP(nn.Module):
    """An MLP as users write one: Linear and ReLU, no normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(),
                                  nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class GRUClassifier(nn.Module):
    """A recurrent classifier: its GRU returns ``(output, h_n)``, a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def _task(model: type[nn.Module], shape: tuple[int, ...], classes: int) -> Task:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randn(n, *shape, generator=gen), torch.randint(0, classes, (n,),
                                                                          generator=gen))

    torch.manual_seed(0)
    return Task(name=model.__name__, make_model=model, teacher_state=model().state_dict(),
                train=split(64), val=split(32), test=split(32), input_shape=shape,
                num_classes=classes)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_importance_offered_for_a_batchnorm_free_mlp_thins_it():
    """At one ratio, every importance the space offers removes the same share of widths; the
    one with no signal here (bn_scale) is not offered: it had left every width as it was."""
    task = _task(PlainMLP, (8, 8), 10)
    resolved = resolve_space(load_space("default"), load_profile("cpu-avx512-vnni"),
                             student_layers(task), model_facts(task))
    assert "bn_scale" not in resolved.importances
    full = _params(task.teacher())
    sizes = {}
    for importance in resolved.importances:
        student = task.teacher()
        prune_structured(student, task.example(), 0.5, 8, importance=importance, data=task.train)
        sizes[importance] = _params(student)
    assert all(size < 0.5 * full for size in sizes.values()), sizes
    assert len(set(sizes.values())) == 1, sizes  # the ratio decides the widths, not the ranking


def test_a_recurrent_models_hidden_states_are_feature_taps_and_distil():
    """A GRU's output is a tuple; its hidden-state sequence is what feature distillation
    compares (before, no tap was found and the fine-tune crashed)."""
    task = _task(GRUClassifier, (12, 3), 4)
    teacher = task.teacher()
    assert feature_taps(teacher, task.example()) == ["gru"]
    assert model_facts(task).feature_taps and not model_facts(task).batchnorm
    history: dict[str, list[float]] = {}
    distill(task.teacher(), teacher, task.train, epochs=1, lr=1e-3, temperature=2.0, alpha=0.5,
            seed=0, loss="feature", loss_weight=1.0, history=history)
    assert len(history["feature"]) == 1 and history["feature"][0] >= 0


def test_a_model_without_feature_maps_is_not_offered_feature_distillation():
    task = _task(PlainMLP, (8, 8), 10)
    assert not model_facts(task).feature_taps
    resolved = resolve_space(load_space("default"), load_profile("cpu-avx512-vnni"),
                             student_layers(task), model_facts(task))
    assert "feature" not in resolved.distill_losses
