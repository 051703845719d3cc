"""The generated signals task: eval splits that resolve a point, and its three models."""

import pytest
import torch

from search._base.errors import ConfigError
from search.tasks import TaskOptions
from search.tasks.signals import (
    CLASSES,
    SPLITS,
    GRUClassifier,
    SequenceResNet,
    SignalTransformer,
    check,
    signals,
)
from search.trial.compress.blocks import droppable_blocks


def test_the_eval_splits_resolve_a_point():
    """2,000 samples each: one point of accuracy is 20 of them."""
    assert SPLITS[1] >= 2000 and SPLITS[2] >= 2000


def test_signals_are_balanced_and_seeded():
    x, y = signals(600, 40, 1.2, torch.Generator().manual_seed(0))
    again, _ = signals(600, 40, 1.2, torch.Generator().manual_seed(0))
    assert x.shape == (600, 4, 40) and torch.equal(x, again)
    counts = torch.bincount(y, minlength=CLASSES)
    assert counts.min() > 60  # every class present, none dominant


def test_the_resnets_blocks_are_found_by_structure_and_the_gru_runs():
    example = torch.zeros(1, 4, 128)
    assert droppable_blocks(SequenceResNet().eval(), example) == [
        "stages.0", "stages.1", "stages.3", "stages.5"]
    assert GRUClassifier()(torch.zeros(2, 40, 4)).shape == (2, CLASSES)


def test_the_transformer_is_torchs_own_encoder_and_a_layer_of_it_can_be_dropped():
    model = SignalTransformer().eval()
    assert isinstance(model.encoder, torch.nn.TransformerEncoder)
    assert model(torch.zeros(2, 40, 4)).shape == (2, CLASSES)
    assert "encoder.layers.1" in droppable_blocks(model, torch.zeros(1, 40, 4))


@pytest.mark.parametrize("options, said", [
    (TaskOptions(arch="resnet18"), "not a model of the signals task"),
    (TaskOptions(data_dir="x"), "do not apply"),
    (TaskOptions(teacher_epochs=0), "at least 1"),
])
def test_options_that_do_not_apply_are_refused(options, said):
    with pytest.raises(ConfigError, match=said):
        check(options)
