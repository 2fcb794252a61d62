"""COCO evaluation with pycocotools, returning named statistics.

AP figures are percentages (0-100), as the papers report them. COCOeval's area bins are COCO's
(small < 32^2, medium < 96^2, large otherwise, in pixels of the original image). COCOeval returns
-1 for a bin without any ground truth; we report 0.0 there so that every metric stays finite.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable, Iterator

import pycocotools.coco
import pycocotools.cocoeval
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


ROW_FIELDS = ("image_id", "label", "x1", "y1", "x2", "y2", "score")
"""Columns of a detection row (:func:`detection_rows`); ``label`` -1 marks an evaluated image."""


def detection_rows(results: Iterable[tuple[int, dict[str, torch.Tensor]]], device: torch.device | str) -> torch.Tensor:
    """Pack ``[(image_id, output), ...]`` of torchvision detectors into one float64 tensor on
    ``device``, ready for a gather: per image, one marker row ``(image_id, -1, 0, 0, 0, 0, 0)``
    (so that images without detections are counted) and one row per detection
    ``(image_id, label, x1, y1, x2, y2, score)``. float64 holds every COCO image id exactly.

    Shape:
        - output ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,) of each image.
        - returned: ``(sum_i (1 + K_i), 7)``.
    """
    parts = []
    for image_id, out in results:
        boxes = out["boxes"].detach().to(device=device, dtype=torch.float64)
        k = boxes.shape[0]
        part = torch.zeros((k + 1, len(ROW_FIELDS)), dtype=torch.float64, device=device)
        part[:, 0] = float(image_id)
        part[0, 1] = -1.0
        if k:
            part[1:, 1] = out["labels"].detach().to(device=device, dtype=torch.float64)
            part[1:, 2:6] = boxes
            part[1:, 6] = out["scores"].detach().to(device=device, dtype=torch.float64)
        parts.append(part)
    if not parts:
        return torch.zeros((0, len(ROW_FIELDS)), dtype=torch.float64, device=device)
    return torch.cat(parts)


def records_from_rows(rows: torch.Tensor, label_to_cat_id: dict[int, int]) -> tuple[list[dict[str, Any]], set[int]]:
    """COCO result records and the set of evaluated image ids from :func:`detection_rows` rows
    (of one or many workers, on the host).

    Shape:
        - rows: ``(R, 7)``.
    """
    data = rows.detach().cpu().double()
    seen = {int(i) for i in data[:, 0].tolist()}
    dets = data[data[:, 1] >= 0]
    xywh = torch.cat([dets[:, 2:4], dets[:, 4:6] - dets[:, 2:4]], dim=1).float().tolist()
    records = [
        {"image_id": int(image_id), "category_id": int(label_to_cat_id[int(label)]),
         "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)}
        for image_id, label, box, score in zip(dets[:, 0].tolist(), dets[:, 1].tolist(), xywh, dets[:, 6].float().tolist())
    ]
    return records, seen


def _mute(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _quiet_pycocotools() -> Iterator[None]:
    """Silence pycocotools' progress prints. Redirecting stdout is not enough inside a Ray Train
    worker, whose patched ``print`` also sends every line to its logger; a module-level ``print``
    in pycocotools' modules shadows the builtin for the duration."""
    modules = (pycocotools.coco, pycocotools.cocoeval)
    for module in modules:
        module.print = _mute  # type: ignore[attr-defined]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for module in modules:
            module.__dict__.pop("print", None)


def coco_stats(coco_gt: COCO, detections: list[dict[str, Any]], image_ids: list[int] | None = None) -> dict[str, float]:
    """Run COCOeval (bbox) and return ``{AP, AP50, AP75, AP_S, AP_M, AP_L}`` in percent.

    ``image_ids`` restricts evaluation to those images (default: every image of ``coco_gt``).
    No detections at all gives zeros.
    """
    if not detections:
        return {name: 0.0 for name in STAT_NAMES}
    with _quiet_pycocotools():
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[:6]
    return {name: (100.0 * float(v) if v >= 0 else 0.0) for name, v in zip(STAT_NAMES, stats)}
