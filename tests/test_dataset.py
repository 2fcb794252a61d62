"""The dataset: uint8 images decoded by torchvision, and flips that move the boxes with the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdsweep.config import DataConfig, ExperimentConfig, KDTermConfig, TrainConfig
from kdsweep.data.coco import DataError
from kdsweep.data.dataset import CocoDetection
from kdsweep.data.loader import build_loaders, check_steps, loader_processes, steps_per_epoch

W, H = 96, 64
BOXES = [[10, 8, 22, 20], [60, 30, 90, 60]]  # xyxy, one bright rectangle each, off-centre


@pytest.fixture()
def data(tmp_path: Path, monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(6):
        pixels = np.zeros((H, W, 3), dtype=np.uint8)
        for x0, y0, x1, y1 in BOXES:
            pixels[y0:y1, x0:x1] = 255
        Image.fromarray(pixels).save(images / f"{i}.png")
        rows.append({"id": i + 1, "file_name": f"{i}.png", "width": W, "height": H})
    anns = [{"id": 10 * im["id"] + j, "image_id": im["id"], "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}
            for im in rows for j, (x0, y0, x1, y1) in enumerate(BOXES)]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": rows, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}))
    return {"train_ann": str(path), "val_ann": str(path), "train_images": str(images), "val_images": str(images)}


def _inside_is_bright(image: torch.Tensor, boxes: torch.Tensor) -> bool:
    """Every box covers bright pixels only, and the bright pixels are exactly the boxes'."""
    mask = torch.zeros(image.shape[-2:], dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.round().int().tolist():
        mask[y0:y1, x0:x1] = True
    return bool(((image[0] == 255) == mask).all())


def test_a_flipped_images_boxes_match_the_flipped_pixels(data):
    plain = CocoDetection(data["train_ann"], data["train_images"])
    flipped = CocoDetection(data["train_ann"], data["train_images"], hflip=1.0)
    image, target = plain[0]
    f_image, f_target = flipped[0]
    assert image.dtype == torch.uint8 and f_image.dtype == torch.uint8 and f_image.is_contiguous()
    assert torch.equal(f_image, image.flip(-1))
    assert torch.equal(f_target["boxes"], torch.tensor([[W - x1, y0, W - x0, y1] for x0, y0, x1, y1 in BOXES], dtype=torch.float32))
    assert _inside_is_bright(image, target["boxes"]) and _inside_is_bright(f_image, f_target["boxes"])
    assert not _inside_is_bright(f_image, target["boxes"])  # the boxes are off-centre: unflipped boxes miss
    assert torch.equal(f_target["labels"], target["labels"]) and f_target["image_id"] == target["image_id"]


def test_flips_happen_with_the_given_probability(data):
    ds = CocoDetection(data["train_ann"], data["train_images"], hflip=0.5)
    reference = CocoDetection(data["train_ann"], data["train_images"])[0][1]["boxes"]
    torch.manual_seed(0)
    flips = sum(not torch.equal(ds[0][1]["boxes"], reference) for _ in range(400))
    assert 160 < flips < 240  # binomial(400, 0.5): mean 200, sd 10


def test_training_flips_validation_never_does(data):
    exp = ExperimentConfig()
    cfg = TrainConfig(hflip=1.0, batch_size=2, eval_batch_size=2, loader_workers=0, aspect_grouping=3)
    loaders = build_loaders(data, exp, cfg, rank=0, world=1)
    assert loaders.val_set.hflip == 0.0
    reference = CocoDetection(data["val_ann"], data["val_images"])
    for images, targets in loaders.val:
        for image, target in zip(images, targets):
            original, original_target = reference[target["image_id"] - 1]
            assert torch.equal(image, original) and torch.equal(target["boxes"], original_target["boxes"])
    images, targets = next(iter(loaders.train))
    assert all(not torch.equal(t["boxes"], reference[0][1]["boxes"]) for t in targets)


def test_loader_processes_give_the_same_batches_as_the_training_loop_alone(data):
    exp = ExperimentConfig()
    batches = {}
    for workers in (0, 2):
        cfg = TrainConfig(hflip=0.0, batch_size=2, loader_workers=workers, aspect_grouping=3, seed=4)
        loaders = build_loaders(data, exp, cfg, rank=0, world=1)
        assert loaders.train.num_workers == workers
        loaders.sampler.set_epoch(1)
        batches[workers] = [(torch.stack(images), [t["image_id"] for t in targets]) for images, targets in loaders.train]
    assert len(batches[0]) == 3
    for (a, ids_a), (b, ids_b) in zip(batches[0], batches[2]):
        assert ids_a == ids_b and torch.equal(a, b)


def test_auto_loader_processes_leave_one_cpu_to_the_training_loop():
    assert loader_processes(TrainConfig(cpus_per_worker=4)) == 3
    assert loader_processes(TrainConfig(cpus_per_worker=0.9)) == 0  # the CPU presets: in the training process
    assert loader_processes(TrainConfig(cpus_per_worker=8, loader_workers=2)) == 2


@pytest.mark.parametrize("max_images, batch_size, world", [(6, 2, 1), (6, 3, 2), (5, 2, 2), (6, 4, 2), (3, 4, 1), (6, 2, 4)])
@pytest.mark.parametrize("grouping", [0, 3])
def test_steps_per_epoch_is_what_each_ranks_train_loader_yields(data, max_images, batch_size, world, grouping):
    """drop_last in the DistributedSampler and in the batches: a rank gets images // world of
    them, in whole batches; none below batch_size x world images."""
    exp = ExperimentConfig(data=DataConfig(max_train_images=max_images))
    cfg = TrainConfig(batch_size=batch_size, num_workers=world, loader_workers=0, aspect_grouping=grouping)
    steps = steps_per_epoch(max_images, cfg)
    for rank in range(world):
        loaders = build_loaders(data, exp, cfg, rank=rank, world=world)
        assert len(loaders.train) == len(list(loaders.train)) == steps
    assert (steps == 0) == (max_images < batch_size * world)


def test_a_training_set_smaller_than_one_step_is_refused_in_one_line_naming_the_field_and_fix():
    small = ExperimentConfig(train=TrainConfig(batch_size=4, num_workers=2))
    check_steps([("baseline", small)], 8, "/d/train.json")  # exactly one step per epoch
    with pytest.raises(DataError) as info:
        check_steps([("baseline", small)], 7, "/d/train.json")
    assert str(info.value) == (
        "/d/train.json: row 'baseline': 7 training image(s) are fewer than one step's train.batch_size 4 x "
        "train.num_workers 2 = 8, so an epoch would have no step; lower train.batch_size or train.num_workers "
        "(--num-workers), or train on at least 8 images")
    limited = ExperimentConfig(data=DataConfig(max_train_images=3), train=TrainConfig(batch_size=4))
    with pytest.raises(DataError, match=r"row 'few': 3 training image\(s\) \(data\.max_train_images 3\) are fewer .* "
                                        r"or raise data\.max_train_images$"):
        check_steps([("ok", ExperimentConfig(train=TrainConfig(batch_size=4))), ("few", limited)], 100, "/d/train.json")
    # a distilling row's teacher trains with teacher_train; a row without KD trains no teacher
    teacher = TrainConfig(batch_size=16)
    check_steps([("baseline", ExperimentConfig(teacher_train=teacher))], 8, "/d/train.json")
    distil = ExperimentConfig(kd=(KDTermConfig(loss="l2"),), teacher_train=teacher)
    with pytest.raises(DataError, match=r"row 'l2': 8 training image\(s\) .* teacher_train\.batch_size 16 x "
                                        r"teacher_train\.num_workers 1 = 16.*lower teacher_train\.batch_size"):
        check_steps([("l2", distil)], 8, "/d/train.json")
