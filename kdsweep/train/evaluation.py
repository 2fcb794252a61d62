"""COCO evaluation with pycocotools (or faster-coco-eval), returning named statistics.

AP figures are percentages (0-100), as the papers report them. COCOeval's area bins are COCO's
(small < 32^2, medium < 96^2, large otherwise, in pixels of the original image). COCOeval returns
-1 for a bin without any ground truth; we report 0.0 there so that every metric stays finite.

Two evaluators compute the same COCOeval (:data:`EVALUATORS`): ``pycocotools``, the reference, and
``faster-coco-eval``, whose per-image matching and
accumulation run in C++; on the tests' synthetic sets they agree to 1e-3 AP (0.1 on our percent
scale; tests/test_evaluation.py), and ``benchmarks/bench_eval.py`` measures the time and memory
of both.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import torch

if TYPE_CHECKING:  # the evaluators are imported where they run: training needs neither of them
    from pycocotools.coco import COCO

STAT_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
EVALUATORS = ("pycocotools", "faster-coco-eval")
"""The ``evaluator`` names :func:`coco_stats` accepts; the first is the reference."""


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


RECORD_CHUNK = 1 << 16
"""Rows turned into records at a time by :func:`records_from_rows` (bounds its temporary arrays)."""


def round_like_python(values: np.ndarray, digits: int) -> np.ndarray:
    """``round(float(v), digits)`` of every float32 ``v`` in ``values``, vectorised, bit for bit.

    Python's ``round`` gives the double nearest to the decimal that is nearest to ``v`` (ties to
    even). For a float32 ``v`` (24 significant bits) and ``digits <= 5``, ``v * 10**digits`` needs
    at most 24 + 12 bits, so the float64 product is exact; ``rint`` rounds it to the nearest
    integer ``n`` (ties to even, as Python does), and the IEEE division ``n / 10**digits`` is the
    double nearest to that decimal: the same double.

    Shape:
        - values: any shape, float32; returned: the same shape, float64.
    """
    if values.dtype != np.float32 or not 0 <= digits <= 5:
        raise ValueError(f"round_like_python: exact for float32 values and 0..5 digits, got {values.dtype}, {digits}")
    scale = float(10**digits)
    return np.rint(values.astype(np.float64) * scale) / scale


def records_from_rows(rows: torch.Tensor, label_to_cat_id: dict[int, int]) -> tuple[list[dict[str, Any]], set[int]]:
    """COCO result records and the set of evaluated image ids from :func:`detection_rows` rows
    (of one or many workers, on the host).

    The records are those of :func:`to_coco_detections` on the same outputs: ``bbox`` xywh of the
    float32 box, each value rounded to 2 decimals, ``score`` the float32 score rounded to 5, as
    Python's ``round`` does (:func:`round_like_python`, vectorised); built :data:`RECORD_CHUNK`
    rows at a time, so that no temporary array or list grows with ``R`` (``rows`` itself is not
    copied when it is a float64 host tensor). A label without a category id raises KeyError.

    Shape:
        - rows: ``(R, 7)``.
    """
    data = rows.detach().cpu().double().numpy()
    seen = set(np.unique(data[:, 0]).astype(np.int64).tolist())
    present = np.unique(data[:, 1][data[:, 1] >= 0].astype(np.int64)).tolist()
    missing = [label for label in present if label not in label_to_cat_id]
    if missing:
        raise KeyError(f"records_from_rows: labels {missing} have no COCO category id in label_to_cat_id")
    cat_of_label = np.zeros(max(present, default=0) + 1, dtype=np.int64)
    for label in present:
        cat_of_label[label] = int(label_to_cat_id[label])
    records: list[dict[str, Any]] = []
    for start in range(0, data.shape[0], RECORD_CHUNK):
        part = data[start : start + RECORD_CHUNK]
        part = part[part[:, 1] >= 0]  # detections; marker rows only count in `seen`
        xywh = np.concatenate([part[:, 2:4], part[:, 4:6] - part[:, 2:4]], axis=1).astype(np.float32)
        boxes = round_like_python(xywh, 2).tolist()
        scores = round_like_python(part[:, 6].astype(np.float32), 5).tolist()
        image_ids = part[:, 0].astype(np.int64).tolist()
        cat_ids = cat_of_label[part[:, 1].astype(np.int64)].tolist()
        records.extend(
            {"image_id": image_id, "category_id": cat_id, "bbox": box, "score": score}
            for image_id, cat_id, box, score in zip(image_ids, cat_ids, boxes, scores)
        )
    return records, seen


def _mute(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _quiet_pycocotools() -> Iterator[None]:
    """Silence pycocotools' progress prints. Redirecting stdout is not enough inside a Ray Train
    worker, whose patched ``print`` also sends every line to its logger; a module-level ``print``
    in pycocotools' modules shadows the builtin for the duration."""
    import pycocotools.coco
    import pycocotools.cocoeval

    modules = (pycocotools.coco, pycocotools.cocoeval)
    for module in modules:
        module.print = _mute  # type: ignore[attr-defined]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for module in modules:
            module.__dict__.pop("print", None)


def coco_stats(
    coco_gt: COCO,
    detections: list[dict[str, Any]],
    image_ids: list[int] | None = None,
    *,
    evaluator: str = "pycocotools",
) -> dict[str, float]:
    """Run COCOeval (bbox) and return ``{AP, AP50, AP75, AP_S, AP_M, AP_L}`` in percent.

    Args:
        coco_gt: the ground truth, a pycocotools ``COCO`` (the validation dataset's ``coco_gt``).
        detections: COCO result records (:func:`records_from_rows`); the evaluators add ``id``,
            ``area``, ``iscrowd`` and ``segmentation`` to them, as COCO's ``loadRes`` does.
        image_ids: restrict evaluation to those images (default: every image of ``coco_gt``).
        evaluator: one of :data:`EVALUATORS`: ``"pycocotools"`` (the reference) or
            ``"faster-coco-eval"`` (8x faster on 5,000 images, the same numbers).

    An area range without any (non-crowd) ground-truth box has no AP: COCOeval says -1, and this
    gives NaN (``AP_L`` of an aerial dataset without large objects), never 0, which would read as
    total failure; tables print it as ``n/a`` and MLflow does not log it. No detections at all
    gives 0 for every range that has ground truth.
    """
    if evaluator not in EVALUATORS:
        raise ValueError(f"coco_stats: unknown evaluator {evaluator!r}; use one of {', '.join(map(repr, EVALUATORS))}")
    if not detections:
        present = _ranges_with_ground_truth(coco_gt, image_ids)
        return {name: 0.0 if present[name] else math.nan for name in STAT_NAMES}
    if evaluator == "faster-coco-eval":
        stats = _faster_coco_eval_stats(coco_gt, detections, image_ids)
    else:
        from pycocotools.cocoeval import COCOeval

        with _quiet_pycocotools():
            coco_dt = coco_gt.loadRes(detections)
            cocoeval = COCOeval(coco_gt, coco_dt, iouType="bbox")
            if image_ids is not None:
                cocoeval.params.imgIds = list(image_ids)
            cocoeval.evaluate()
            cocoeval.accumulate()
            cocoeval.summarize()
        stats = cocoeval.stats[:6]
    return {name: (100.0 * float(v) if v >= 0 else math.nan) for name, v in zip(STAT_NAMES, stats)}


AREA_RANGES = {"AP": (0.0, 1e10), "AP50": (0.0, 1e10), "AP75": (0.0, 1e10), "AP_S": (0.0, 32.0**2),
               "AP_M": (32.0**2, 96.0**2), "AP_L": (96.0**2, 1e10)}
"""COCOeval's area ranges (``params.areaRng``, both ends included) of each statistic."""


def _ranges_with_ground_truth(coco_gt: COCO, image_ids: list[int] | None) -> dict[str, bool]:
    """Whether each statistic's area range holds a non-crowd ground-truth box of the evaluated images."""
    wanted = None if image_ids is None else set(image_ids)
    areas = [float(a.get("area", 0.0)) for a in coco_gt.dataset.get("annotations", [])
             if not a.get("iscrowd", 0) and (wanted is None or a["image_id"] in wanted)]
    return {name: any(lo <= area <= hi for area in areas) for name, (lo, hi) in AREA_RANGES.items()}


def _faster_coco_eval_stats(
    coco_gt: COCO, detections: list[dict[str, Any]], image_ids: list[int] | None
) -> np.ndarray:
    """COCOeval's first six stats (0-1, -1 for an empty bin) computed by faster-coco-eval.

    faster-coco-eval's own ``COCO`` is built from ``coco_gt.dataset``, with a shallow copy of each
    annotation: its evaluator writes ``ignore`` into the ground-truth annotations it reads, and the
    pycocotools ``COCO`` stays as it was. Its messages go to ``print_function``, muted here.
    """
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    dataset = {**coco_gt.dataset, "annotations": [dict(ann) for ann in coco_gt.dataset.get("annotations", [])]}
    gt = FasterCOCO(dataset, print_function=_mute)
    cocoeval = COCOeval_faster(gt, gt.loadRes(detections), iouType="bbox", print_function=_mute)
    if image_ids is not None:
        cocoeval.params.imgIds = list(image_ids)
    cocoeval.evaluate()
    cocoeval.accumulate()
    cocoeval.summarize()
    return cocoeval.stats[:6]
