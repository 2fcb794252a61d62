"""VisDrone-DET -> COCO instances conversion.

Input (one split, as distributed, e.g. ``VisDrone2019-DET-val/``)::

    src/images/0000001_02999_d_0000005.jpg
    src/annotations/0000001_02999_d_0000005.txt   # same stem as the image

Each annotation line is ``left,top,width,height,score,category,truncation,occlusion``
(integers, pixels; some releases end lines with a trailing comma, which is accepted).
Categories: 0 ignored region, 1 pedestrian, 2 people, 3 bicycle, 4 car, 5 van, 6 truck,
7 tricycle, 8 awning-tricycle, 9 bus, 10 motor, 11 others.

Output::

    out/<split>.json   # COCO instances: the 10 benchmark categories, ids 1..10 as in VisDrone
    out/images/<name>  # the images, same file names

What is kept and why:

* **Ignored regions (category 0)** are areas the annotators did not label (dense crowds, far
  away traffic). The VisDrone toolkit drops detections that fall into them, so a detector is
  neither rewarded nor penalised there. COCO cannot express this: its only ignore mechanism,
  ``iscrowd=1``, is per category - a crowd box has one ``category_id`` and pycocotools lets it
  absorb only detections of that category, so a class-agnostic region would need one copy per
  class (10 fake annotations per region), and the training side (torchvision detectors, our
  :class:`~kdsweep.data.dataset.CocoDetection`) has no ignore notion at all: unlabelled objects
  there would be learned as background and, at evaluation, every correct detection of them
  would be a false positive. So the converter **paints each ignored region with the image's
  mean colour** (per channel, computed over the original image) and drops its box: nothing is
  left there to detect, to reward or to punish. Annotated boxes that end up at least
  :data:`MAX_PAINTED` (50 %) painted over are dropped too (their object is mostly gone). Only
  images with ignored regions are re-encoded (JPEG quality :data:`JPEG_QUALITY`); all others
  are copied byte for byte.
* **"others" (11)** is not one of the 10 evaluated classes: dropped (not painted).
* **score 0** marks a box the benchmark ignores: dropped (not painted; only category-0
  regions are).
* Boxes are clipped to the image; boxes of zero area (before or after clipping) are dropped.
* Every kept box gets ``area`` = w*h, ``iscrowd`` 0 and the extra fields ``truncation`` and
  ``occlusion`` (VisDrone's 0..2 levels). ``info.stats`` counts what was dropped and why.

Every image needs its annotation file (an annotation file without an image is ignored). All
annotation files are parsed before anything is written: a malformed line raises
:class:`~kdsweep.data.coco.DataError` naming the file, the line number and the field, and
leaves ``out`` untouched.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kdsweep.data.coco import DataError

CATEGORIES = ("pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle",
              "awning-tricycle", "bus", "motor")
IGNORED, OTHERS = 0, 11
FIELDS = ("left", "top", "width", "height", "score", "category", "truncation", "occlusion")
SPLIT_SUFFIXES = ("test-dev", "train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_PAINTED = 0.5
JPEG_QUALITY = 95


@dataclass(frozen=True)
class VisDroneBox:
    """One parsed annotation line (pixels, as in the file)."""

    line: int
    left: float
    top: float
    width: float
    height: float
    score: float
    category: int
    truncation: int
    occlusion: int


def _split_name(src: Path) -> str:
    """``VisDrone2019-DET-val`` -> ``val`` (also train, test-dev); any other name as it is."""
    name = src.name
    for suffix in SPLIT_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return name


def _value(text: str, path: Path, line: int, name: str, *, integer: bool) -> int | float:
    """Parse field ``name`` of ``line``; DataError naming file, line and field when it is bad."""
    where = f"{path}: line {line}: field '{name}'"
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where} is {text.strip()!r}, not a number; expected {','.join(FIELDS)}") from None
    if not math.isfinite(value):
        raise DataError(f"{where} is {text.strip()!r}; it must be a finite number")
    if integer and not value.is_integer():
        raise DataError(f"{where} is {text.strip()!r}; it must be an integer")
    return int(value) if value.is_integer() else value


def parse_annotations(path: Path) -> list[VisDroneBox]:
    """All boxes of one VisDrone annotation file; blank lines are skipped.

    Raises DataError (file, line number, field) for a wrong field count, a non-number, a
    negative width/height or a category outside 0..11.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read annotation file ({exc.__class__.__name__})") from None
    boxes: list[VisDroneBox] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        parts = raw.strip().split(",")
        while len(parts) > len(FIELDS) and not parts[-1].strip():
            parts.pop()  # trailing comma(s)
        if len(parts) < len(FIELDS):
            raise DataError(f"{path}: line {number}: field '{FIELDS[len(parts)]}' is missing; "
                            f"expected {len(FIELDS)} values {','.join(FIELDS)}")
        if len(parts) > len(FIELDS):
            raise DataError(f"{path}: line {number}: field {len(FIELDS) + 1} (after 'occlusion') is unexpected; "
                            f"expected {len(FIELDS)} values {','.join(FIELDS)}")
        values = {name: _value(part, path, number, name, integer=name in FIELDS[4:] and name != "score")
                  for name, part in zip(FIELDS, parts)}
        for name in ("width", "height", "truncation", "occlusion"):
            if values[name] < 0:
                raise DataError(f"{path}: line {number}: field '{name}' is {values[name]}; it must be >= 0")
        if not IGNORED <= values["category"] <= OTHERS:
            raise DataError(f"{path}: line {number}: field 'category' is {values['category']}; "
                            f"VisDrone categories are {IGNORED}..{OTHERS}")
        boxes.append(VisDroneBox(line=number, **values))
    return boxes


def _clip(box: VisDroneBox, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Box clipped to the image as (x0, y0, x1, y1), or None when nothing is left."""
    x0, y0 = max(0, box.left), max(0, box.top)
    x1, y1 = min(width, box.left + box.width), min(height, box.top + box.height)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _pixels(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """Integer pixel extent (x0, y0, x1, y1) covering a clipped box (half-open)."""
    x0, y0, x1, y1 = box
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def _paint(image: Image.Image, regions: list[tuple[float, float, float, float]]) -> tuple[Image.Image, np.ndarray]:
    """Fill ``regions`` with the mean colour of ``image``; returns (new RGB image, painted mask)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    mean = np.rint(array.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    mask = np.zeros(array.shape[:2], dtype=bool)
    for region in regions:
        x0, y0, x1, y1 = _pixels(region)
        mask[y0:y1, x0:x1] = True
    array[mask] = mean
    return Image.fromarray(array), mask


def _painted_fraction(mask: np.ndarray, box: tuple[float, float, float, float]) -> float:
    x0, y0, x1, y1 = _pixels(box)
    patch = mask[y0:y1, x0:x1]
    return float(patch.mean()) if patch.size else 0.0


def _number(value: float) -> float | int:
    """Keep integers as int in the JSON (VisDrone boxes are integer pixels)."""
    return int(value) if float(value).is_integer() else round(float(value), 2)


def _image_files(images_dir: Path) -> list[Path]:
    return sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def convert_visdrone(src: str | Path, out: str | Path, *, split: str | None = None) -> dict[str, Path]:
    """Convert one VisDrone-DET split folder to COCO (see the module docstring for the rules).

    Args:
        src: folder with ``images/`` and ``annotations/``.
        out: output folder; ``<split>.json`` and ``images/`` are written there (an existing
            JSON of the same split is replaced; images of other splits are left alone).
        split: name of the split; default from ``src``'s name (``...-val`` -> ``val``,
            ``...-train`` -> ``train``, ``...-test-dev`` -> ``test-dev``, else the name).

    Returns:
        ``{split: out/<split>.json, "images": out/images}`` (absolute).

    Raises:
        DataError: missing folders or annotation files, unreadable images, malformed lines.
    """
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    src_images, src_anns = src / "images", src / "annotations"
    for folder in (src_images, src_anns):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found; a VisDrone-DET split has images/ and annotations/")
    split = split if split is not None else _split_name(src)
    if not split or split == "images" or "/" in split or os.sep in split or split.startswith("."):
        raise DataError(f"{src}: split name {split!r} cannot name a JSON file; pass split=")
    out_images = out / "images"
    if out_images.resolve() == src_images:
        raise DataError(f"{out}: output images/ would overwrite the source images; choose another out")
    files = _image_files(src_images)
    if not files:
        raise DataError(f"{src_images}: no images ({', '.join('*' + x for x in IMAGE_SUFFIXES)}) found")
    # parse every annotation file first: a malformed line stops the conversion before any write
    parsed: list[tuple[Path, list[VisDroneBox]]] = []
    for image_path in files:
        ann_path = src_anns / f"{image_path.stem}.txt"
        if not ann_path.is_file():
            raise DataError(f"{image_path}: annotation file {ann_path} not found")
        parsed.append((image_path, parse_annotations(ann_path)))
    out_images.mkdir(parents=True, exist_ok=True)

    stats = {k: 0 for k in ("images", "lines", "annotations", "ignored_regions", "others", "score_zero",
                            "zero_area", "clipped", "mostly_painted", "images_painted")}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (image_path, boxes) in enumerate(parsed, start=1):
        painted: Image.Image | None = None
        painted_mask: np.ndarray | None = None
        try:
            with Image.open(image_path) as handle:
                width, height = handle.size
                regions = [r for b in boxes if b.category == IGNORED
                           for r in [_clip(b, width, height)] if r is not None]
                if regions:
                    painted, painted_mask = _paint(handle, regions)
        except Exception as exc:  # noqa: BLE001 - any decoder error means unreadable
            raise DataError(f"{image_path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
        target = out_images / image_path.name
        if painted is not None:
            jpeg = image_path.suffix.lower() in (".jpg", ".jpeg")
            painted.save(target, **({"quality": JPEG_QUALITY} if jpeg else {}))
            stats["images_painted"] += 1
        else:
            shutil.copyfile(image_path, target)
        images.append({"id": image_id, "file_name": image_path.name, "width": width, "height": height})
        stats["images"] += 1
        stats["lines"] += len(boxes)
        for box in boxes:
            if box.category == IGNORED:
                stats["ignored_regions"] += 1
                continue
            if box.category == OTHERS:
                stats["others"] += 1
                continue
            if box.score == 0:
                stats["score_zero"] += 1
                continue
            clipped = _clip(box, width, height)
            if clipped is None:
                stats["zero_area"] += 1
                continue
            if painted_mask is not None and _painted_fraction(painted_mask, clipped) >= MAX_PAINTED:
                stats["mostly_painted"] += 1
                continue
            x0, y0, x1, y1 = clipped
            stats["clipped"] += clipped != (box.left, box.top, box.left + box.width, box.top + box.height)
            w, h = _number(x1 - x0), _number(y1 - y0)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": box.category,
                "bbox": [_number(x0), _number(y0), w, h], "area": _number(w * h), "iscrowd": 0,
                "truncation": box.truncation, "occlusion": box.occlusion,
            })
    stats["annotations"] = len(annotations)
    coco = {
        "info": {"description": f"VisDrone-DET {split} converted by kdsweep", "source": str(src),
                 "split": split, "ignored_regions": "painted with the image mean colour",
                 "stats": stats},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "visdrone"}
                       for i, name in enumerate(CATEGORIES)],
    }
    json_path = out / f"{split}.json"
    tmp = out / f".{split}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(coco, separators=(",", ":")))
    tmp.replace(json_path)
    return {split: json_path, "images": out_images}
