"""Each vocabulary is declared once (``search._base.names``) and every part that takes one of
its names takes all of them: the space schema offers them, and the module that implements
them knows each one."""

from __future__ import annotations

import typing

import pytest
from torch import nn

from search._base import names
from search._base.records import Choices
from search.space.schema import SearchSpace
from search.trial.compress import prune, quantize
from search.trial.compress.sparsity import Sparsifier


def test_each_tuple_is_its_literal():
    pairs = [(names.Precision, names.PRECISIONS), (names.DistillLoss, names.DISTILL_LOSSES),
             (names.ChannelImportance, names.CHANNEL_IMPORTANCES),
             (names.SparsityCriterion, names.SPARSITY_CRITERIA),
             (names.CalibrationMethod, names.CALIBRATION_METHODS),
             (names.QuantMode, names.QUANT_MODES), (names.Segment, names.SEGMENTS)]
    for literal, values in pairs:
        assert typing.get_args(literal) == values
    assert set(names.RUNNABLE_PRECISIONS) | {"bf16"} == set(names.PRECISIONS)


def test_the_space_offers_every_name_by_default():
    space = SearchSpace()
    assert tuple(space.distillation.distill_loss) == names.DISTILL_LOSSES
    assert tuple(space.pruning.structured_importance) == names.CHANNEL_IMPORTANCES
    assert tuple(space.pruning.unstructured_criterion) == names.SPARSITY_CRITERIA
    assert tuple(space.quantization.calibration_method) == names.CALIBRATION_METHODS


def test_the_space_and_the_record_name_each_dimension_alike():
    """One name per dimension: a space key that is a trial choice is spelled as the choice."""
    space = SearchSpace()
    keys = set(space.pruning.model_fields) | set(space.distillation.model_fields) | \
        set(space.quantization.model_fields)
    record = set(Choices.__dataclass_fields__)
    # space keys that are not a choice of their own: how a dimension is drawn, not what
    assert keys - record == {"structured_granularity", "granularity"}


def test_a_renamed_space_key_says_its_new_name():
    with pytest.raises(ValueError, match="'loss' is now called 'distill_loss'"):
        SearchSpace.model_validate({"distillation": {"loss": ["response"]}})
    with pytest.raises(ValueError, match="'mode' is now called 'quant_mode'"):
        SearchSpace.model_validate({"quantization": {"mode": ["static"]}})


@pytest.mark.parametrize("name", names.CHANNEL_IMPORTANCES)
def test_channel_pruning_implements_every_importance(name):
    assert prune._importance(name) is not None


def test_quantization_implements_every_calibration_method():
    assert tuple(quantize._CALIBRATION) == names.CALIBRATION_METHODS


@pytest.mark.parametrize("criterion", names.SPARSITY_CRITERIA)
@pytest.mark.parametrize("scope", names.SPARSITY_SCOPES)
def test_weight_sparsity_implements_every_criterion_and_scope(criterion, scope):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    Sparsifier(model, sparsity=0.5, criterion=criterion, scope=scope).start(None, gradual=False)
    assert sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear)) > 0
