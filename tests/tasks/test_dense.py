"""Detection and segmentation: canvases, decoding, metrics, and a user's detector end to end."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from search._base.errors import ConfigError
from search.tasks import TaskOptions, check_task
from search.tasks.canvases import make_canvases
from search.tasks.detection import DetectionMetric, padded_targets, targets_of
from search.tasks.digits import glyph_splits
from search.tasks.segmentation import MeanIoU
from search.trial.compress.prune import output_layers, prune_structured
from tests.support.dense_families import fcos_small
from tests.support.helpers import write_space


def test_canvases_boxes_hold_their_masks():
    glyphs, _ = glyph_splits()
    images, labels = glyphs["val"]
    c = make_canvases(images, labels, 50, 64, seed=1)
    again = make_canvases(images, labels, 50, 64, seed=1)
    assert torch.equal(c.images, again.images) and torch.equal(c.boxes, again.boxes)
    assert c.images.shape == (50, 1, 64, 64) and c.masks.shape == (50, 64, 64)
    for boxes, mask in zip(c.boxes, c.masks, strict=True):
        inside = torch.zeros(64, 64, dtype=torch.bool)
        for cls, x1, y1, x2, y2 in boxes[boxes[:, 0] >= 0].tolist():
            assert 12 <= x2 - x1 <= 26 and 0 <= x1 and x2 <= 64
            region = mask[int(y1):int(y2), int(x1):int(x2)]
            assert (region == cls + 1).any()  # its strokes carry its class
            inside[int(y1):int(y2), int(x1):int(x2)] = True
        assert not mask[~inside].any()  # no labelled pixel outside every box


class _Oracle:
    """Decodes to the targets themselves (score 1), optionally shifted by ``dx`` pixels."""

    def __init__(self, y: torch.Tensor, dx: float = 0.0) -> None:
        self.y, self.dx = y, dx

    def decode(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for t in targets_of(self.y[outputs[:, 0, 0].long()]):
            boxes = t["boxes"] + torch.tensor([self.dx, 0, self.dx, 0])
            out.append({"boxes": boxes, "labels": t["labels"], "scores": torch.ones(len(boxes))})
        return out


def test_detection_metric_is_coco_map_of_the_decoded_boxes():
    y = padded_targets([torch.tensor([[4.0, 4, 24, 24]]), torch.tensor([[30.0, 30, 50, 50],
                                                                        [2, 40, 20, 58]])],
                       [torch.tensor([3]), torch.tensor([1, 2])])
    index = torch.arange(2, dtype=torch.float32)[:, None, None].expand(2, 1, 1)
    assert DetectionMetric(_Oracle(y))(index, y) == pytest.approx(100.0)
    shifted = DetectionMetric(_Oracle(y, dx=5.0))(index, y)  # IoU 0.6 for 20 px boxes
    assert 10.0 < shifted < 60.0
    assert DetectionMetric(_Oracle(y, dx=5.0), iou="0.5")(index, y) == pytest.approx(100.0)


def test_mean_iou_counts_every_class_alike():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :2] = 1
    perfect = nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert MeanIoU(3)(perfect, labels) == pytest.approx(100.0)
    background = torch.zeros(2, 3, 8, 8)
    background[:, 0] = 1
    # background IoU 48/64, class 1 IoU 0; class 2 absent from both: torchmetrics counts it 0
    assert MeanIoU(3)(background, labels) < 40.0


def test_a_detectors_output_layers_keep_their_widths_and_its_heads_are_thinned():
    model = fcos_small().eval()
    x = torch.zeros(1, 1, 64, 64)
    names = output_layers(model, x)
    assert names == ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                     "head.regression_head.bbox_ctrness"]
    before = model(x).shape
    prune_structured(model, x, 0.5, 8)
    assert model(x).shape == before
    tower = model.head.classification_head.conv
    assert tower[0].out_channels == 32  # GroupNorm(32, 64) heads are thinned too
    norm = tower[1]
    assert norm.num_channels == 32 and norm.num_channels // norm.num_groups == 2


@pytest.mark.parametrize("task", ["digits-detection", "digits-segmentation"])
def test_bundled_dense_tasks_refuse_options_that_do_not_apply(task):
    with pytest.raises(ConfigError, match="does not apply"):
        check_task(task, TaskOptions(arch="resnet18"))


def test_a_users_detector_runs_a_study_end_to_end(tmp_path, fast_profile_path, monkeypatch,
                                                  capsys):
    """A detector plugin unlike the bundled one (its own backbone, torchvision's FPN over two
    levels, a one-conv GroupNorm FCOS head, 32x32 canvases), through the command: every
    trial completes, and every output names the metric. The default space but for
    fine-tunes of at most one epoch (distillation on dense outputs runs all the same)."""
    from search.cli import main

    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, "one-epoch", distillation={"epochs": {"low": 0, "high": 1}})
    capsys.readouterr()
    code = main(["--task", "tests.support.dense_families:make_detector_task",
                 "--profile", str(fast_profile_path), "--budget", "6", "--teacher-epochs", "8",
                 "--space", space, "--refine", "1", "--refine-epochs", "1", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    study = tmp_path / "search-runs" / "tests.support.dense_families.make_detector_task-fast-host"
    trials = pd.read_csv(study / "trials.csv")
    assert (trials["state"] == "FAIL").sum() == 0, trials.get("failure")
    assert (trials["state"] != "FAIL").sum() >= 6  # the budget, plus any refinement adopted
    reference = trials[trials["reference"].fillna(False).astype(bool)].iloc[0]
    assert reference["accuracy"] > 5.0  # the teacher learned to find digits (mAP points)
    assert (pd.read_csv(study / "pareto.csv")["metric"] == "mAP").all()
    summary = (study / "summary.md").read_text()
    assert "metric: mAP" in summary and "| mAP | latency ms" in summary
    assert "the network's alone (FCOS decoding and NMS in Python" in summary
    assert "mAP" in captured.out and "allowed mAP drop" in captured.out
