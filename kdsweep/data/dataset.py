"""The training and validation dataset: compact annotations, uint8 images, optional flips.

Images leave the dataset as they were decoded, uint8 ``(3, H, W)``: a quarter of float32's bytes
through the loader's queues and pinned memory. The float conversion (``/ 255``) happens on the
training device (:func:`kdsweep.train.engine.move_batch`); the detectors' transform normalises
there too.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec (a ``DeprecationWarning``);
they are libjpeg-turbo and libpng as before and decode our JPEGs to the same pixels as PIL. When
torchvision removes them, :meth:`CocoDetection.__getitem__`'s one decode call moves to TorchCodec.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from kdsweep.data.annotations import CompactAnnotations, load_compact
from kdsweep.data.coco import DataError

__all__ = ["CocoDetection", "collate"]


class CocoDetection(torch.utils.data.Dataset):
    """A COCO instances file as ``(image, target)`` pairs for torchvision detectors.

    ``image``: uint8 ``(3, H, W)`` RGB, decoded by torchvision (:func:`torchvision.io.decode_image`).
    ``target``: ``boxes`` float32 ``(N, 4)`` xyxy, ``labels`` int64 ``(N,)`` in 1..K (category ids
    sorted, made contiguous; 0 is background), ``image_id`` int. Boxes are clipped to the image;
    crowd boxes and slivers are left out (:mod:`kdsweep.data.annotations`; crowd ones stay in
    ``coco_gt``). Images are in id order (``image_ids``); ``max_images`` keeps the first ones.

    ``hflip``: probability of flipping an image and its boxes horizontally
    (``torchvision.transforms.v2.RandomHorizontalFlip`` on ``tv_tensors.BoundingBoxes``); 0 for
    validation. The annotations are the memory-mapped compact form (:func:`load_compact`), so a
    worker and its loader processes share them. The file is not validated here: call
    :func:`kdsweep.data.coco.load_validated` first (a launch does).
    """

    def __init__(self, ann_path: str | Path, images_dir: str | Path, *, max_images: int | None = None,
                 hflip: float = 0.0) -> None:
        self.ann_path, self.images_dir = Path(ann_path), Path(images_dir)
        self.annotations: CompactAnnotations = load_compact(self.ann_path)
        total = len(self.annotations)
        self.length = total if max_images is None else min(total, max_images)
        self.categories = list(self.annotations.category_names)
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(self.annotations.category_ids)}
        self.image_ids = [int(i) for i in self.annotations.image_ids[: self.length]]
        self.hflip = hflip
        self._flip = v2.RandomHorizontalFlip(p=hflip) if hflip > 0 else None
        self._coco_gt = None

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def aspect_ratios(self) -> list[float]:
        """Width / height of each image, from the annotation file (for aspect-ratio grouping)."""
        return self.annotations.aspect_ratios()[: self.length].tolist()

    @property
    def coco_gt(self):
        """A pycocotools COCO index over the (possibly truncated) image set, built from the JSON
        on first use (evaluation needs it; training does not)."""
        if self._coco_gt is None:
            from pycocotools.coco import COCO  # only evaluation pays for it

            dataset = json.loads(self.ann_path.read_text())
            keep = set(self.image_ids)
            coco = COCO()
            coco.dataset = {
                **{k: v for k, v in dataset.items() if k not in ("images", "annotations")},
                "images": [im for im in dataset["images"] if im["id"] in keep],
                "annotations": [a for a in dataset["annotations"] if a["image_id"] in keep],
            }
            for ann in coco.dataset["annotations"]:
                ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
                ann.setdefault("iscrowd", 0)
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco_gt = coco
        return self._coco_gt

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        name = self.annotations.file_name(index)
        image_id = int(self.annotations.image_ids[index])
        try:
            image = decode_image(str(self.images_dir / name), mode=ImageReadMode.RGB).contiguous()
        except Exception as exc:  # noqa: BLE001 - any decoder error means unreadable
            raise DataError(f"{self.ann_path.name}: image {image_id}: file_name '{name}' "
                            f"is not a readable image ({exc.__class__.__name__}); run `kdsweep data check`") from None
        boxes, labels = self.annotations.targets(index)
        boxes = torch.from_numpy(boxes)
        if self._flip is not None:
            image, boxes = self._flip(tv_tensors.Image(image),
                                      tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:])))
            image, boxes = image.as_subclass(torch.Tensor), boxes.as_subclass(torch.Tensor)
        return image, {"boxes": boxes, "labels": torch.from_numpy(labels), "image_id": image_id}


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep images and targets as lists (torchvision detectors take variable sizes)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
