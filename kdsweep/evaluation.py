"""COCO evaluation with pycocotools, returning named statistics.

AP figures are percentages (0-100), as the papers report them. COCOeval's area bins are COCO's
(small < 32^2, medium < 96^2, large otherwise, in pixels of the original image). COCOeval returns
-1 for a bin without any ground truth; we report 0.0 there so that every metric stays finite.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")


def to_coco_detections(
    outputs: Iterable[dict[str, torch.Tensor]],
    image_ids: Iterable[int],
    label_to_cat_id: dict[int, int],
) -> list[dict[str, Any]]:
    """Convert torchvision detector outputs to COCO result records.

    Args:
        outputs: per image ``boxes`` (K, 4) xyxy in original-image pixels, ``scores`` (K,),
            ``labels`` (K,) contiguous 1..num_classes.
        image_ids: the COCO image id of each output.
        label_to_cat_id: contiguous label -> COCO category id.
    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.
    """
    records: list[dict[str, Any]] = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        for box, score, label in zip(xywh, scores, labels):
            records.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_cat_id[int(label)]),
                    "bbox": [round(v, 2) for v in box],
                    "score": round(float(score), 5),
                }
            )
    return records


def coco_stats(coco_gt: COCO, detections: list[dict[str, Any]], image_ids: list[int] | None = None) -> dict[str, float]:
    """Run COCOeval (bbox) and return ``{AP, AP50, AP75, AP_S, AP_M, AP_L}`` in percent.

    ``image_ids`` restricts evaluation to those images (default: every image of ``coco_gt``).
    No detections at all gives zeros.
    """
    if not detections:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[:6]
    return {name: (100.0 * float(v) if v >= 0 else 0.0) for name, v in zip(STAT_NAMES, stats)}
