"""Detection: one-stage detectors as a network plus a decoder, scored on COCO-style mAP.

What is compressed and measured is the *network*: image in, one dense tensor out,
``(N, L, C + 5)`` for ``L`` locations over all pyramid levels (per location: ``C`` class
logits, 4 box regressions, 1 centerness logit). Decoding (points to boxes, score
threshold, top-k, NMS) is not a network: it runs after it in Python with torchvision's own
FCOS code, outside the ONNX graph, so the measured latency is the network's alone (the
task's ``decoding`` says so and how long decoding takes per image).

- :class:`FCOSNetwork` wraps torchvision's ``FCOS`` (any backbone with an FPN, built with
  ``weights=None``) or its backbone and head into that one-output network;
- :class:`FCOSDecoder` holds the decoding settings and the anchor points; it is the
  training loss (torchvision's FCOS loss: focal, GIoU, centerness) and the decoder;
- :class:`DetectionMetric` is mAP@[.5:.95] in points (torchmetrics'
  ``MeanAveragePrecision``, COCO's protocol) over a decoder's boxes.

A plugin task with a detector of its own writes ``Task(metric=DetectionMetric(decoder),
loss=decoder.loss, metric_name="mAP", ...)``, where ``decoder`` is an
:class:`FCOSDecoder` or any object with ``decode(outputs) -> [{"boxes", "scores",
"labels"}]``; targets are ``(N, K, 5)`` float rows ``[class, x1, y1, x2, y2]``, class -1
for padding (:func:`padded_targets`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["DetectionMetric", "FCOSDecoder", "FCOSNetwork", "decoding_note", "padded_targets",
           "targets_of"]


class _Decoder(Protocol):
    def decode(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]: ...


class FCOSNetwork(nn.Module):
    """The network of a torchvision FCOS detector: backbone (with its FPN) and head, their
    per-level outputs flattened and concatenated into one ``(N, L, C + 5)`` tensor.

    Give it a ``torchvision.models.detection.FCOS`` (its transform, anchors and
    post-processing are not used: the inputs are expected normalised and at their final
    size), or ``backbone=`` and ``head=`` directly.
    """

    def __init__(self, detector: nn.Module | None = None, *, backbone: nn.Module | None = None,
                 head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone if detector is None else detector.backbone
        self.head = head if detector is None else detector.head
        if self.backbone is None or self.head is None:
            raise ValueError("FCOSNetwork needs a torchvision FCOS detector, or backbone= and head=")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = list(self.backbone(x).values())
        out = self.head(features)
        return torch.cat([out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]], dim=-1)

    @torch.no_grad()
    def level_sizes(self, example: torch.Tensor) -> list[tuple[int, int]]:
        """The (height, width) of each pyramid level for inputs like ``example``."""
        was = self.training
        self.eval()
        try:
            return [tuple(f.shape[-2:]) for f in self.backbone(example).values()]
        finally:
            self.train(was)


def padded_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                   max_objects: int | None = None) -> torch.Tensor:
    """Per-image boxes ``(k, 4)`` xyxy and labels ``(k,)`` as one ``(N, K, 5)`` float tensor
    (the ``Split.y`` of a detection task), padded with class -1."""
    k = max_objects or max((len(b) for b in boxes), default=0)
    out = torch.full((len(boxes), max(k, 1), 5), -1.0)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        out[i, : len(b), 0] = lab.float()
        out[i, : len(b), 1:] = b.float()
    return out


def targets_of(y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Padded ``(N, K, 5)`` targets as torchvision's list of ``{"boxes", "labels"}``."""
    keep = y[..., 0] >= 0
    return [{"boxes": row[k, 1:], "labels": row[k, 0].long()} for row, k in zip(y, keep, strict=True)]


@dataclass(frozen=True)
class FCOSDecoder:
    """FCOS's anchor points, loss and decoding for a network of known pyramid sizes.

    ``level_sizes``: each pyramid level's (height, width) at ``image_size``
    (:meth:`FCOSNetwork.level_sizes`); ``anchor_sizes``: one size per level, as
    torchvision's FCOS (8, 16, 32, ...: the level's stride). Decoding keeps scores above
    ``score_thresh`` (0.05: mAP counts low-confidence boxes too), the best
    ``topk_candidates`` per level, then NMS at ``nms_thresh``.
    """

    num_classes: int
    image_size: tuple[int, int]
    level_sizes: tuple[tuple[int, int], ...]
    anchor_sizes: tuple[int, ...] = ()
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    topk_candidates: int = 1000
    center_sampling_radius: float = 1.5
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # the torchvision helper is rebuilt where used
        return {**self.__dict__, "_cache": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def _core(self) -> Any:
        """torchvision's FCOS, used for its loss and post-processing only (its backbone is a
        stand-in: nothing of it runs)."""
        core = self._cache.get("core")
        if core is None:
            from torchvision.models.detection.fcos import FCOS

            stand_in = nn.Identity()
            stand_in.out_channels = 32
            core = FCOS(stand_in, self.num_classes, score_thresh=self.score_thresh,
                        nms_thresh=self.nms_thresh, detections_per_img=self.detections_per_img,
                        topk_candidates=self.topk_candidates,
                        center_sampling_radius=self.center_sampling_radius)
            self._cache["core"] = core
        return core

    @property
    def anchors(self) -> torch.Tensor:
        """The ``(L, 4)`` anchor boxes of one image, levels concatenated (torchvision's
        ``AnchorGenerator``, as FCOS makes them)."""
        anchors = self._cache.get("anchors")
        if anchors is None:
            from torchvision.models.detection.anchor_utils import AnchorGenerator
            from torchvision.models.detection.image_list import ImageList

            sizes = self.anchor_sizes or tuple(8 * 2 ** i for i in range(len(self.level_sizes)))
            gen = AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))
            images = ImageList(torch.zeros(1, 1, *self.image_size), [tuple(self.image_size)])
            feats = [torch.zeros(1, 1, h, w) for h, w in self.level_sizes]
            anchors = gen(images, feats)[0]
            self._cache["anchors"] = anchors
        return anchors

    @property
    def per_level(self) -> list[int]:
        return [h * w for h, w in self.level_sizes]

    def _heads(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if outputs.dim() != 3 or outputs.shape[1] != len(self.anchors) \
                or outputs.shape[2] != self.num_classes + 5:
            raise ValueError(f"expected the network's outputs of shape (N, {len(self.anchors)}, "
                             f"{self.num_classes + 5}), got {tuple(outputs.shape)}")
        c = self.num_classes
        return {"cls_logits": outputs[..., :c], "bbox_regression": outputs[..., c : c + 4],
                "bbox_ctrness": outputs[..., c + 4 :]}

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """torchvision's FCOS training loss (sigmoid focal + GIoU + centerness BCE) of the
        network's ``outputs`` against padded targets ``y``."""
        heads = self._heads(outputs)
        anchors = [self.anchors.to(outputs.device)] * len(outputs)
        losses = self._core.compute_loss(targets_of(y), heads, anchors, self.per_level)
        return sum(losses.values())

    @torch.no_grad()
    def decode(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Boxes, scores and labels per image (score threshold, top-k, NMS)."""
        heads = {k: list(v.split(self.per_level, dim=1)) for k, v in self._heads(outputs).items()}
        anchors = [list(self.anchors.split(self.per_level))] * len(outputs)
        return self._core.postprocess_detections(heads, anchors, [tuple(self.image_size)] * len(outputs))


@dataclass(frozen=True)
class DetectionMetric:
    """COCO mAP@[.5:.95] in points (0-100) of decoded outputs against padded targets, by
    torchmetrics' ``MeanAveragePrecision`` (``iou="0.5"``: mAP@.5 instead)."""

    decoder: _Decoder
    iou: str = "0.5:0.95"
    batch_size: int = 256

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> float:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox",
                                      backend=_backend())
        for start in range(0, len(outputs), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            metric.update(self.decoder.decode(outputs[chunk].float()), targets_of(y[chunk]))
        result = metric.compute()
        return 100.0 * float(result["map" if self.iou == "0.5:0.95" else "map_50"])


def _backend() -> str:
    """faster-coco-eval where installed (it is a dependency), else pycocotools."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "pycocotools"
    return "faster_coco_eval"


def decoding_note(decoder: _Decoder, outputs: torch.Tensor) -> str:
    """What runs after the network and its cost per image, timed on ``outputs``: the
    study says it beside every latency (which is the network's alone)."""
    start = time.perf_counter()
    decoder.decode(outputs)
    per_image = (time.perf_counter() - start) * 1e3 / max(1, len(outputs))
    return (f"decoding and NMS run after the network, in Python (torchvision), outside the "
            f"measured latency: {per_image:.2f} ms per image on this machine")
