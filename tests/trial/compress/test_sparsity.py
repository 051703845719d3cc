"""Weight sparsity: each criterion and pattern does what it says on the digits ResNet."""

import torch

from search.trial.compress import export_onnx
from search.trial.compress.distill import distill
from search.trial.compress.sparsity import Sparsifier, fisher_scores, nm_mask, taylor_scores
from search.trial.evaluate import onnx_accuracy


def _kept(model, sparsifier):
    return {name: (w != 0) for name, w in sparsifier.weights.items()}


def _overlap(a, b):
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(v.numel() for v in a.values())


def test_fisher_and_magnitude_choose_different_weights(task):
    by_mag, by_fisher = task.teacher(), task.teacher()
    mag = Sparsifier(by_mag, sparsity=0.5)
    mag.start(None, gradual=False)
    fisher = Sparsifier(by_fisher, sparsity=0.5, criterion="fisher")
    fisher.start(fisher_scores(by_fisher, task.train), gradual=False)
    for s in (mag, fisher):
        total = sum(w.numel() for w in s.weights.values())
        zeros = sum(int((w == 0).sum()) for w in s.weights.values())
        assert abs(zeros / total - 0.5) < 0.01
    agreement = _overlap(_kept(by_mag, mag), _kept(by_fisher, fisher))
    assert agreement < 0.95  # a different criterion, not magnitude renamed


def test_movement_scores_accumulate_during_fine_tune_and_differ_from_magnitude(task):
    model = task.teacher()
    sparsifier = Sparsifier(model, sparsity=0.5, criterion="movement", scope="layer")
    sparsifier.start(None, gradual=True)
    assert not sparsifier.masks  # nothing pruned before the scores exist
    distill(model, task.teacher(), task.train, epochs=1, lr=1e-3, temperature=4.0, alpha=0.5,
            seed=0, hooks=[sparsifier])
    sparsifier.finish()
    assert sparsifier.masks
    for name, w in sparsifier.weights.items():  # per-layer scope: every layer at 50 %
        assert abs(float((w == 0).float().mean()) - 0.5) < 0.02, name
    by_mag = task.teacher()
    mag = Sparsifier(by_mag, sparsity=0.5, scope="layer")
    mag.start(None, gradual=False)
    assert _overlap(_kept(model, sparsifier), _kept(by_mag, mag)) < 0.9


def test_taylor_scores_without_fine_tune_are_first_order(task):
    """The score is -w * dL/dw, checked against that product computed here with autograd on
    the same 64 inputs (one batch, so the sampling order cannot matter)."""
    import torch.nn.functional as F

    from search.tasks._base import Split

    data = Split(task.train.x[:64], task.train.y[:64])
    model = task.teacher()
    scores = taylor_scores(model, data, samples=64, batch=64)
    weights = {name: w for name, w in Sparsifier(model).weights.items()}
    assert set(scores) == set(weights)

    reference = task.teacher().eval()
    ref_weights = Sparsifier(reference).weights
    F.cross_entropy(reference(data.x), data.y).backward()
    for name, w in ref_weights.items():
        expected = -(w.detach() * w.grad)
        assert float(expected.abs().sum()) > 0, name
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-7, msg=name)


def test_two_of_four_pattern_along_input_channels(task):
    w = torch.randn(8, 16, 3, 3)
    mask = nm_mask(w.abs(), 2, 4)
    grouped = mask.permute(0, 2, 3, 1).reshape(8, 3, 3, 4, 4)
    assert bool((grouped.sum(-1) == 2).all())
    assert nm_mask(torch.randn(8, 3, 3, 3), 2, 4) is None  # 3 input channels: stays dense
    model = task.teacher()
    s = Sparsifier(model, pattern="2:4")
    s.start(None, gradual=False)
    assert "stem.0" not in s.masks  # one input channel
    assert s.masks and all(float(m.float().mean()) == 0.5 for m in s.masks.values())


def test_masks_survive_fine_tuning_and_export(task):
    model = task.teacher()
    s = Sparsifier(model, sparsity=0.6)
    s.start(None, gradual=False)
    distill(model, task.teacher(), task.train, epochs=1, lr=3e-3, temperature=4.0, alpha=0.5,
            seed=0, hooks=[s])
    s.finish()
    zeros = sum(int((w == 0).sum()) for w in s.weights.values())
    total = sum(w.numel() for w in s.weights.values())
    assert zeros / total >= 0.6 - 0.01
    assert onnx_accuracy(export_onnx(model, task.input_shape), task.val) > 90


def test_sparse_transfer_keeps_the_checkpoints_zeros(task, profile):
    from dataclasses import replace

    from search._base.records import Choices, TrialRecord
    from search.trial.pipeline import compress

    sparse = task.teacher()
    Sparsifier(sparse, sparsity=0.7).start(None, gradual=False)
    state = {k: v.clone() for k, v in sparse.state_dict().items()}
    zeros = {k: v == 0 for k, v in state.items() if k.endswith("weight") and v.dim() > 1}
    sparse_task = replace(task, sparse_state=state)
    record = compress(TrialRecord(0, Choices(init="sparse", epochs=1, lr=3e-3)), sparse_task,
                      profile)
    assert record.sparsity >= 0.69
    assert record.accuracy > 90
    # and exactly the checkpoint's zeros stay zero through a fine-tune
    student = sparse_task.sparse_student()
    keeper = Sparsifier.from_zeros(student)
    distill(student, task.teacher(), task.train, epochs=1, lr=3e-3, temperature=4.0, alpha=0.5,
            seed=0, hooks=[keeper])
    keeper.finish()
    after = student.state_dict()
    for name, was_zero in zeros.items():
        assert bool((after[name][was_zero] == 0).all()), name
