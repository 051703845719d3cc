"""The Task record's helpers: where the logits and the classes are in a model's output."""

import pytest
import torch

from search.tasks import class_dim, classification_loss, logits_of, top1_accuracy


def test_logits_come_from_every_output_form_a_classifier_returns():
    logits = torch.randn(2, 3)
    assert logits_of(logits) is logits
    assert logits_of((logits, torch.zeros(2, 8))) is logits
    assert logits_of({"logits": logits, "features": torch.zeros(2, 8)}) is logits
    # the exported model's first output is scored: a dict with the logits second would be
    # scored on the wrong tensor, so it is refused with the fix
    with pytest.raises(TypeError, match="first key must be 'logits'"):
        logits_of({"features": torch.zeros(2, 8), "logits": logits})
    with pytest.raises(TypeError, match="a classifier must return its logits"):
        logits_of("logits")


@pytest.mark.parametrize("logits, labels, dim", [
    ((8, 10), (8,), 1),  # one label per sample
    ((8, 11, 6, 6), (8, 6, 6), 1),  # segmentation: per pixel
    ((8, 16, 4), (8, 16), 2),  # sequence tagger: per token, classes last
    ((8, 16, 16), (8, 16), 1),  # ambiguous (as many classes as tokens): PyTorch's convention
])
def test_classes_are_found_where_the_model_puts_them(logits, labels, dim):
    x = torch.randn(*logits)
    y = torch.randint(0, logits[dim], labels)
    assert class_dim(x, y) == dim
    expected = 100.0 * float((x.argmax(dim) == y).double().mean())
    assert top1_accuracy(x, y) == pytest.approx(expected)
    assert 0.0 <= top1_accuracy(x, y) <= 100.0
    reference = torch.nn.functional.cross_entropy(x.movedim(dim, 1), y)
    assert float(classification_loss(x, y)) == pytest.approx(float(reference))
