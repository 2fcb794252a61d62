"""Compact annotations: a COCO instances file as a few flat numpy arrays, cached on disk.

A training worker needs, per image, its file name, its size and its boxes with labels; nothing
else of the JSON (no polygons, no per-object dicts). Parsing COCO train2017 (448 MB of JSON) into
Python objects costs gigabytes per process, and every DataLoader process touching those objects
copies them (reference counts defeat copy-on-write). Here the file is converted once into
``.npy`` arrays under ``KDSWEEP_HOME/compact/<key>/`` (the key, like the validation cache's:
the file's path, size and modification time), and every process memory-maps them: the pages are
shared between processes and read on demand. Every file of a cache folder is checked before it is
used (:func:`ensure_compact`); a missing, truncated or inconsistent one is rebuilt.

Layout (``N`` images in id order, ``M`` kept boxes)::

    image_ids   int64   (N,)      COCO image ids
    sizes       float64 (N, 2)    width, height from the file
    name_bytes  uint8   (B,)      the file names, UTF-8, concatenated
    name_ends   int64   (N,)      end offset of each name in name_bytes
    box_ends    int64   (N,)      end offset of each image's boxes in boxes/labels
    boxes       float32 (M, 4)    x0, y0, x1, y1, clipped to the image
    labels      int64   (M,)      contiguous 1..K (category ids sorted; 0 is background)
    meta.json                     categories (id, name), the source file, the format version

Crowd boxes and boxes narrower than :data:`MIN_BOX_SIDE` after clipping are left out, as the
detectors' targets want; the evaluation ground truth is the JSON itself (``CocoDetection.coco_gt``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdsweep import paths as kdsweep_paths
from kdsweep.data.coco import DataError

FORMAT_VERSION = 1
MIN_BOX_SIDE = 0.01  # px; narrower boxes (after clipping to the image) are left out of targets
ARRAYS = ("image_ids", "sizes", "name_bytes", "name_ends", "box_ends", "boxes", "labels")


@dataclass(frozen=True)
class CompactAnnotations:
    """The arrays of the module docstring (memory-mapped when loaded from the cache)."""

    image_ids: np.ndarray
    sizes: np.ndarray
    name_bytes: np.ndarray
    name_ends: np.ndarray
    box_ends: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    category_ids: tuple[int, ...]
    category_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    def file_name(self, index: int) -> str:
        start = int(self.name_ends[index - 1]) if index else 0
        return bytes(self.name_bytes[start:int(self.name_ends[index])]).decode()

    def targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(k, 4)`` float32 xyxy and labels ``(k,)`` int64 of image ``index`` (copies)."""
        start = int(self.box_ends[index - 1]) if index else 0
        end = int(self.box_ends[index])
        return np.array(self.boxes[start:end], dtype=np.float32), np.array(self.labels[start:end], dtype=np.int64)

    def aspect_ratios(self) -> np.ndarray:
        """Width / height of every image ``(N,)``, from the file's sizes (no image is opened)."""
        return np.asarray(self.sizes[:, 0], dtype=np.float64) / np.asarray(self.sizes[:, 1], dtype=np.float64)


def clipped_xyxy(bbox: list[float], width: float, height: float) -> list[float] | None:
    """COCO [x, y, w, h] as [x0, y0, x1, y1] clipped to the image; None if (nearly) empty."""
    x, y, w, h = bbox
    x0, y0 = max(float(x), 0.0), max(float(y), 0.0)
    x1, y1 = min(float(x + w), float(width)), min(float(y + h), float(height))
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        return None
    return [x0, y0, x1, y1]


def _integer_id(value: Any, path: Path, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise DataError(f"{path}: {what} {value!r} is not an integer; training needs integer image ids (as COCO's)")
    return int(value)


def convert(dataset: dict[str, Any], path: Path) -> CompactAnnotations:
    """The compact form of a parsed COCO instances file (``path`` only words errors)."""
    cats = sorted(dataset["categories"], key=lambda c: c["id"])
    cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
    ids = [_integer_id(im["id"], path, "image id") for im in dataset["images"]]
    order = sorted(range(len(ids)), key=ids.__getitem__)
    images = [dataset["images"][i] for i in order]
    image_ids = np.array([ids[i] for i in order], dtype=np.int64)
    index = {im["id"]: i for i, im in enumerate(images)}
    sizes = np.array([(im["width"], im["height"]) for im in images], dtype=np.float64).reshape(-1, 2)
    names = [str(im["file_name"]).encode() for im in images]
    name_ends = np.cumsum([len(n) for n in names], dtype=np.int64)
    name_bytes = np.frombuffer(b"".join(names), dtype=np.uint8).copy()
    per_image: list[list[tuple[list[float], int]]] = [[] for _ in images]
    for ann in dataset["annotations"]:
        i = index.get(ann["image_id"])
        if i is None or ann.get("iscrowd", 0):
            continue
        box = clipped_xyxy(ann["bbox"], sizes[i, 0], sizes[i, 1])
        if box is not None:
            per_image[i].append((box, cat_to_label[ann["category_id"]]))
    box_ends = np.cumsum([len(items) for items in per_image], dtype=np.int64)
    flat = [item for items in per_image for item in items]
    boxes = np.array([b for b, _ in flat], dtype=np.float32).reshape(-1, 4)
    labels = np.array([label for _, label in flat], dtype=np.int64)
    return CompactAnnotations(
        image_ids=image_ids, sizes=sizes, name_bytes=name_bytes, name_ends=name_ends, box_ends=box_ends, boxes=boxes,
        labels=labels, category_ids=tuple(int(c["id"]) for c in cats),
        category_names=tuple(str(c.get("name", c["id"])) for c in cats),
    )


def cache_dir(ann_path: Path) -> Path:
    """``KDSWEEP_HOME/compact/<key>``: the key hashes the file's absolute path, size and
    modification time (a new version of the file gets a new folder)."""
    return kdsweep_paths.home() / "compact" / kdsweep_paths.file_version_key(ann_path, f"v{FORMAT_VERSION}")


def _write(compact: CompactAnnotations, folder: Path, source: Path) -> None:
    """Write atomically: into a temporary sibling folder, then one rename (a concurrent writer
    of the same file loses the race harmlessly)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(compact, name))
        meta = {"version": FORMAT_VERSION, "source": str(source.resolve()),
                "categories": [{"id": i, "name": n} for i, n in zip(compact.category_ids, compact.category_names)]}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process wrote it first
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Broken(Exception):
    """A cache folder that cannot be used as it is (the message says what is wrong)."""


def _read(folder: Path) -> CompactAnnotations:
    """The cached arrays of ``folder``, memory-mapped, after checking every file the loader needs.

    Checked: ``meta.json`` parses and has this :data:`FORMAT_VERSION`; each of :data:`ARRAYS`
    exists and its ``.npy`` header's shape fits the file's size (``np.load`` with ``mmap_mode``
    reads the header, then maps that many bytes: a truncated file fails there); and the arrays
    agree with each other (N images in ``image_ids``, ``sizes``, ``name_ends``, ``box_ends``;
    ``name_ends[-1]`` bytes of names; ``box_ends[-1]`` boxes and labels).

    Raises:
        _Broken: what is wrong, naming the file.
    """
    try:
        meta = json.loads((folder / "meta.json").read_text())
        version, categories = meta["version"], meta["categories"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Broken(f"{folder / 'meta.json'}: unreadable ({exc.__class__.__name__}: {exc})") from None
    if version != FORMAT_VERSION:
        raise _Broken(f"{folder / 'meta.json'}: format version {version!r}, not {FORMAT_VERSION}")
    arrays = {}
    for name in ARRAYS:
        try:
            arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # missing, truncated ("mmap length is greater"), garbled
            raise _Broken(f"{folder / f'{name}.npy'}: unreadable ({exc.__class__.__name__}: {exc})") from None
    n, m = arrays["image_ids"].size, arrays["labels"].size  # a wrong rank fails the comparison below
    shapes = {name: array.shape for name, array in arrays.items()}
    consistent = shapes == {"image_ids": (n,), "sizes": (n, 2), "name_bytes": (arrays["name_bytes"].size,),
                            "name_ends": (n,), "box_ends": (n,), "boxes": (m, 4), "labels": (m,)} and (
        (int(arrays["name_ends"][-1]), int(arrays["box_ends"][-1])) if n else (0, 0)) == (shapes["name_bytes"][0], m)
    if not consistent:
        raise _Broken(f"{folder}: the arrays disagree in length ({', '.join(f'{k} {v}' for k, v in shapes.items())})")
    return CompactAnnotations(**arrays, category_ids=tuple(c["id"] for c in categories),
                              category_names=tuple(c["name"] for c in categories))


def load_compact(ann_path: str | Path, *, use_cache: bool = True) -> CompactAnnotations:
    """The compact annotations of ``ann_path``: memory-mapped from the cache, converted (and
    cached) on first use. The launcher converts each file once before any worker starts
    (:func:`ensure_compact`); a worker on a node without that cache converts it there once."""
    path = Path(ann_path)
    if not use_cache:
        return convert(json.loads(path.read_text()), path)
    folder, checked = _ensure(path)
    if checked is not None:  # the copy that was there, read and checked once
        return checked
    try:
        return _read(folder)
    except _Broken as exc:  # broken right after it was written: another process, or the disk
        raise DataError(f"{path}: its compact cache is broken ({exc}); delete {folder} and run again") from None


def ensure_compact(ann_path: str | Path) -> Path:
    """Convert ``ann_path`` into the cache unless a complete copy is there; return the cache folder.

    Every file of the folder is checked (:func:`_read`), not only ``meta.json``: a missing,
    truncated or inconsistent array (a full disk, a killed copy, a hand edit) is rebuilt from the
    JSON, not memory-mapped into a worker's error. The broken folder is first renamed aside (one
    atomic rename; a process that mapped it keeps its pages), then the new one is written as on
    first use (:func:`_write`)."""
    return _ensure(Path(ann_path))[0]


def _ensure(path: Path) -> tuple[Path, CompactAnnotations | None]:
    """:func:`ensure_compact`'s work: the cache folder, and its arrays when a complete copy was
    already there (read and checked once, so that :func:`load_compact` does not read it again);
    None when it was (re)built here."""
    folder = cache_dir(path)
    if folder.exists():
        try:
            return folder, _read(folder)
        except _Broken:
            aside = folder.with_name(f".{folder.name}-broken-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(folder, aside)
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(aside, ignore_errors=True)
    _write(convert(json.loads(path.read_text()), path), folder, path)
    return folder, None
