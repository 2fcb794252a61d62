"""COCO evaluation wrapper: perfect detections give AP 100, names and area bins are right."""

import pytest
import torch
from pycocotools.coco import COCO

from kdsweep.train.evaluation import STAT_NAMES, coco_stats, to_coco_detections


def _gt():
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 200, "height": 200, "file_name": "a.jpg"}, {"id": 2, "width": 200, "height": 200, "file_name": "b.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},  # small
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [50, 50, 60, 60], "area": 3600, "iscrowd": 0},  # medium
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 150, 150], "area": 22500, "iscrowd": 0},  # large
        ],
        "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}],
    }
    coco.createIndex()
    return coco


def _outputs(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.ones(len(boxes)), "labels": torch.tensor(labels)}


def test_perfect_detections_score_100_and_keys():
    outs = [_outputs([[10, 10, 30, 30], [50, 50, 110, 110]], [1, 2]), _outputs([[0, 0, 150, 150]], [1])]
    dets = to_coco_detections(outs, [1, 2], {1: 7, 2: 9})
    assert dets[0] == {"image_id": 1, "category_id": 7, "bbox": [10.0, 10.0, 20.0, 20.0], "score": 1.0}
    stats = coco_stats(_gt(), dets)
    assert tuple(stats) == STAT_NAMES
    for name in STAT_NAMES:
        assert stats[name] == pytest.approx(100.0)


def test_missing_small_object_lowers_only_ap_s():
    outs = [_outputs([[50, 50, 110, 110]], [2]), _outputs([[0, 0, 150, 150]], [1])]
    stats = coco_stats(_gt(), to_coco_detections(outs, [1, 2], {1: 7, 2: 9}))
    assert stats["AP_S"] == pytest.approx(0.0)
    assert stats["AP_M"] == pytest.approx(100.0) and stats["AP_L"] == pytest.approx(100.0)
    assert 0 < stats["AP"] < 100


def test_no_detections_is_all_zero_and_finite():
    assert coco_stats(_gt(), []) == {name: 0.0 for name in STAT_NAMES}
