"""COCO-format detection data: path resolution, validation, and the training dataset.

Validation never raises on bad data: it collects one line per problem naming the file, the
record id and the field, with a fix. Training calls :func:`load_validated`, which raises a
:class:`DataError` when anything is wrong, before any worker starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdsweep import paths as kdsweep_paths
from kdsweep.config import DataConfig
from kdsweep.data.image_check import check_images, printer
from kdsweep.data.synthetic import ensure_synthetic

MAX_LINES_PER_KIND = 20
RULES_VERSION = 2  # of validate_coco's checks: a clean result of older rules is checked again (_validation_stamp)
SMALL, MEDIUM = 32**2, 96**2


class DataError(ValueError):
    """A dataset problem a user must fix; the message names file, id and field."""


@dataclass(frozen=True)
class DataPaths:
    """Absolute paths of the train/val annotation files and their image folders."""

    train_ann: Path
    val_ann: Path
    train_images: Path
    val_images: Path

    def strings(self) -> dict[str, str]:
        """The four paths as strings by field name: the ``data`` mapping a Ray worker gets."""
        return {name: str(value) for name, value in vars(self).items()}


def resolve_data(cfg: DataConfig) -> DataPaths:
    """``cfg.root`` (synth layout), or ``train_ann``/``val_ann`` + ``images``, or the embedded
    synthetic dataset (generated on first use). Raises DataError for missing files."""
    if cfg.root:
        root = Path(cfg.root).expanduser().resolve()
        paths = DataPaths(root / "train.json", root / "val.json", root / "images", root / "images")
    elif cfg.train_ann or cfg.val_ann:
        if not (cfg.train_ann and cfg.val_ann):
            raise DataError("data: give both train_ann and val_ann (or root)")
        train, val = Path(cfg.train_ann).expanduser().resolve(), Path(cfg.val_ann).expanduser().resolve()
        if cfg.images:
            images = Path(cfg.images).expanduser().resolve()
            paths = DataPaths(train, val, images, images)
        else:
            paths = DataPaths(train, val, train.parent / "images", val.parent / "images")
    else:
        root = ensure_synthetic(cfg)
        paths = DataPaths(root / "train.json", root / "val.json", root / "images", root / "images")
    for ann in (paths.train_ann, paths.val_ann):
        if not ann.is_file():
            raise DataError(f"{ann}: annotation file not found; check --data / data.root / data.train_ann")
    for images in (paths.train_images, paths.val_images):
        if not images.is_dir():
            raise DataError(f"{images}: image folder not found; pass --images or put images/ beside the JSON")
    return paths


DIGEST_CHUNK = 1 << 22  # bytes read at a time when hashing an annotation file


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of the bytes of ``path``, remembered under ``KDSWEEP_HOME/digests`` by the
    file's version key (absolute path, size, modification time: the compact and validation caches'
    key), so that COCO's 448 MB train2017 JSON is read once per version, not once per launch."""
    memo = kdsweep_paths.home() / "digests" / f"{kdsweep_paths.file_version_key(path, 'sha256')}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK):
            digest.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(digest.hexdigest())
    os.replace(tmp, memo)  # atomic: a concurrent launch writes the same value
    return digest.hexdigest()


def referenced_images_digest(ann_path: Path, images_dir: Path) -> str:
    """SHA-256 (hex) of the ``(file_name, size in bytes)`` of exactly the images ``ann_path``
    references, in its image-id order, each looked up in ``images_dir`` as the dataset loads it
    (:class:`~kdsweep.data.dataset.CocoDetection`). The names come from the compact cache, which
    the launcher has just built (:func:`~kdsweep.data.annotations.ensure_compact`); one ``os.stat``
    per image, no file read, nothing else in ``images_dir`` is listed. A referenced image that is
    missing or unreadable counts with size -1 (validation has already reported it), so that adding
    it later changes the version."""
    from kdsweep.data.annotations import load_compact  # here: annotations imports this module

    compact = load_compact(ann_path)
    ends, raw = compact.name_ends.tolist(), bytes(compact.name_bytes)  # names: UTF-8, concatenated
    digest = hashlib.sha256()
    start = 0
    for end in ends:
        name = raw[start:end].decode()
        start = end
        try:
            size = os.stat(os.path.join(images_dir, name)).st_size
        except (OSError, ValueError):  # missing, a broken link, a name the OS refuses (NUL)
            size = -1
        digest.update(f"{name}\t{size}\n".encode())
    return digest.hexdigest()


def data_version(paths: DataPaths) -> str:
    """The version of the data at ``paths`` (20 hex digits): what a teacher trained on it depends
    on besides the paths (:func:`~kdsweep.orchestrate.trials.teacher_hash`). Computed once per
    launch, on the driver, and handed down with the paths (``data["version"]``).

    Our reading of issue 24's "the data's version": a **content** hash of both annotation files
    (:func:`file_digest`; the boxes and the image list, file names included, are what a teacher
    learns from), and for each split the **size** of every image its annotation file references
    (:func:`referenced_images_digest`), one ``stat`` each (a few seconds for COCO's 123k images).

    Detected: any change of either JSON's bytes; a referenced image added, removed, or replaced
    by one of another size (JPEG re-encodes almost always differ). Not detected, on purpose or by
    cost: an image replaced by another of identical byte size (the images, 18 GB for COCO, are not
    read); modification times (a byte-identical regeneration, e.g. the synthetic data, which is
    deterministic in its seed (:func:`~kdsweep.data.synthetic.generate`), a copy or an rsync
    without ``-t`` keeps its version, hence its teacher); and any file the annotations do not
    reference, so that ``--images`` may point at a whole COCO root (train2017, val2017,
    test2017, stray outputs) without a new version, and a retrained teacher, for every unrelated
    file added there, and without walking that folder."""
    parts = [f"{name}={file_digest(getattr(paths, name))}" for name in ("train_ann", "val_ann")]
    parts += [f"{split}_images={referenced_images_digest(getattr(paths, f'{split}_ann'), getattr(paths, f'{split}_images'))}"
              for split in ("train", "val")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@dataclass
class ValidationReport:
    """What :func:`validate_coco` found.

    ``problems``: one line each, at most MAX_LINES_PER_KIND per kind plus an ``... and N more``
    line; ``num_problems`` counts every problem, shown or not.
    """

    problems: list[str] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    size_counts: dict[str, int] = field(default_factory=lambda: {"small": 0, "medium": 0, "large": 0})
    num_images: int = 0
    num_annotations: int = 0
    num_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class _Problems:
    """Collects problem lines, at most MAX_LINES_PER_KIND per kind."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.counts: Counter[str] = Counter()

    def add(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= MAX_LINES_PER_KIND:
            self.lines.append(f"{self.name}: {text}")

    def finish(self) -> list[str]:
        extra = [f"{self.name}: ... and {n - MAX_LINES_PER_KIND} more {kind} problems" for kind, n in self.counts.items() if n > MAX_LINES_PER_KIND]
        return self.lines + extra

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer_id(value: Any) -> bool:
    """True for a COCO id: a 64-bit integer (``3``, or ``3.0`` as some writers emit it), not a bool
    or a string (training sorts category ids and keeps image ids in an int64 array: mixed types
    cannot be sorted, a larger number not stored)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return False
    return -2**63 <= int(value) < 2**63


def _read_json(path: Path, report: ValidationReport) -> dict[str, Any] | None:
    if not path.is_file():
        report.problems.append(f"{path.name}: file not found at {path}")
        return None
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        report.problems.append(f"{path.name}: cannot read {path} ({exc.__class__.__name__}: {exc.strerror or exc})")
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.problems.append(f"{path.name}: not valid JSON ({exc.__class__.__name__} at {getattr(exc, 'lineno', '?')}:{getattr(exc, 'colno', '?')}); fix the file")
        return None
    if not isinstance(data, dict):
        report.problems.append(f"{path.name}: top level must be an object with images, annotations, categories")
        return None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        report.problems.append(f"{path.name}: missing or non-list top-level key '{missing[0]}'; a COCO instances file needs images, annotations, categories")
        return None
    return data


def _check_records(records: list[Any], kind: str, keys: tuple[str, ...], out: _Problems) -> dict[Any, dict[str, Any]]:
    """Records with all ``keys`` by id; missing keys and duplicate ids become problems."""
    by_id: dict[Any, dict[str, Any]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            out.add(f"{kind}-record", f"{kind} #{i}: not an object")
            continue
        missing = [k for k in keys if k not in rec]
        if missing:
            out.add(f"{kind}-key", f"{kind} {rec.get('id', '#' + str(i))}: missing field '{missing[0]}'")
            continue
        if not _integer_id(rec["id"]):
            out.add(f"{kind}-id", f"{kind} #{i}: field 'id' {rec['id']!r} must be an integer (training needs 64-bit "
                                  f"integer COCO ids); give every {kind} an integer id")
            continue
        if rec["id"] in by_id:
            out.add(f"{kind}-dup", f"{kind} {rec['id']}: duplicate id; ids must be unique")
            continue
        by_id[rec["id"]] = rec
    return by_id


def _check_images(images: dict[Any, dict[str, Any]], images_dir: Path | None, out: _Problems, *, decode: bool,
                  progress: Callable[[int, int], None] | None) -> None:
    sized = {}
    for image_id, img in images.items():
        size_ok = _number(img["width"]) and _number(img["height"]) and img["width"] > 0 and img["height"] > 0
        if not size_ok:
            out.add("image-size", f"image {image_id}: width/height {img['width']!r}x{img['height']!r} must be positive numbers")
        sized[image_id] = size_ok
    if images_dir is None:
        return
    ids = list(images)
    results = check_images([str(images_dir / str(images[i]["file_name"])) for i in ids], decode=decode, progress=progress)
    for image_id, result in zip(ids, results):
        img = images[image_id]
        if result == "missing":
            out.add("image-file", f"image {image_id}: file_name '{img['file_name']}' not found in {images_dir}; "
                                  "fix file_name or add the file (or pass --images)")
        elif isinstance(result, str):
            out.add("image-file", f"image {image_id}: file_name '{img['file_name']}' is not a readable image ({result})")
        elif sized[image_id] and tuple(result) != (img["width"], img["height"]):
            out.add("image-dims", f"image {image_id}: file '{img['file_name']}' is {result[0]}x{result[1]} but width/height "
                                  f"say {img['width']!r}x{img['height']!r}; fix width/height")


def _check_annotation(ann: dict[str, Any], images: dict, categories: dict, out: _Problems, report: ValidationReport) -> None:
    aid, bbox = ann["id"], ann["bbox"]
    if not _integer_id(ann["image_id"]) or ann["image_id"] not in images:
        out.add("ann-image", f"annotation {aid}: image_id {ann['image_id']!r} is not an image id")
        return
    if not _integer_id(ann["category_id"]) or ann["category_id"] not in categories:
        out.add("ann-cat", f"annotation {aid}: category_id {ann['category_id']!r} is not a category id")
        return
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
        out.add("bbox", f"annotation {aid}: bbox {bbox!r} must be 4 finite numbers [x, y, w, h]")
        return
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        out.add("bbox-size", f"annotation {aid}: bbox {bbox!r} has non-positive width or height; fix or drop it")
        return
    img = images[ann["image_id"]]
    if _number(img["width"]) and _number(img["height"]):
        if x < -1 or y < -1 or x + w > img["width"] + 1 or y + h > img["height"] + 1:
            out.add("bbox-outside", f"annotation {aid}: bbox {bbox!r} lies outside image {ann['image_id']} ({img['width']}x{img['height']}); clip it")
            return
    if ann.get("iscrowd", 0):
        return
    area = w * h
    report.size_counts["small" if area < SMALL else "medium" if area < MEDIUM else "large"] += 1
    name = str(categories[ann["category_id"]].get("name", ann["category_id"]))
    report.class_counts[name] = report.class_counts.get(name, 0) + 1


def validate_coco(ann_path: str | Path, images_dir: str | Path | None = None, *, check_images: bool = True,
                  decode: bool = True, progress: Callable[[int, int], None] | None = None) -> ValidationReport:
    """Validate a COCO instances file (and its images); never raises on bad data.

    ``images_dir`` defaults to ``images/`` beside the JSON file. Every image file is opened, in
    parallel over this machine's CPUs (:mod:`kdsweep.data.image_check`): its header must give the
    file's width and height, and with ``decode`` (the default) the whole file must decode.
    ``progress(done, total)`` is called as the images are checked.
    """
    path = Path(ann_path)
    report = ValidationReport()
    data = _read_json(path, report)
    if data is None:
        report.num_problems = len(report.problems)
        return report
    out = _Problems(path.name)
    images = _check_records(data["images"], "image", ("id", "file_name", "width", "height"), out)
    categories = _check_records(data["categories"], "category", ("id",), out)
    annotations = _check_records(data["annotations"], "annotation", ("id", "image_id", "category_id", "bbox"), out)
    directory = (Path(images_dir) if images_dir else path.parent / "images") if check_images else None
    if directory is not None and not directory.is_dir():
        out.add("image-dir", f"image folder {directory} not found; pass --images")
        directory = None
    _check_images(images, directory, out, decode=decode, progress=progress)
    for ann in annotations.values():
        _check_annotation(ann, images, categories, out, report)
    if not data["images"]:
        out.add("no-images", "field 'images' is empty: no image to train or evaluate on; "
                "use an instances file that lists its images and their boxes")
    if images and not out.total and not report.class_counts:
        crowd = f" ({len(annotations)} crowd region(s) only)" if annotations else ""
        out.add("no-annotations", f"no annotations: {len(images)} image(s) and no box to learn or evaluate{crowd}; "
                "use an instances file with boxes (images without boxes are fine beside images with them)")
    report.problems = out.finish()
    report.num_problems = out.total
    report.num_images, report.num_annotations = len(images), len(annotations)
    return report


def _validation_stamp(ann_path: Path, images_dir: str | Path | None, decode: bool) -> Path:
    """Marker file of a successful validation of this annotation file version and image folder
    under these rules (:data:`RULES_VERSION`): ``<key>.json`` after a full decode,
    ``<key>-headers.json`` after reading headers."""
    folder = Path(images_dir).resolve() if images_dir else ann_path.resolve().parent / "images"
    key = kdsweep_paths.file_version_key(ann_path, f"{folder}|rules {RULES_VERSION}")
    return kdsweep_paths.home() / "validated" / f"{key}{'' if decode else '-headers'}.json"


def load_validated(ann_path: str | Path, images_dir: str | Path | None = None, *, use_cache: bool = True,
                   decode: bool = False) -> ValidationReport:
    """Validate like ``kdsweep data check``; raise a one-line :class:`DataError` with the first
    problem and how many there are.

    A launch reads every image's header (``decode=False``: exists, readable, the size the file
    says), in parallel with progress on stderr; ``kdsweep data check`` decodes every image in full.
    A clean result is remembered under ``KDSWEEP_HOME/validated`` keyed by the annotation file's
    path, size and modification time and the image folder, so that a large dataset is checked
    once, not before every sweep (a full decode's result also stands for a header check).
    ``use_cache=False`` re-checks.
    """
    path = Path(ann_path)
    modes = (True,) if decode else (True, False)  # a full decode's stamp stands for a header check
    stamps = [_validation_stamp(path, images_dir, mode) for mode in modes] if use_cache and path.is_file() else []
    for stamp in stamps:
        if stamp.is_file():
            return ValidationReport(**json.loads(stamp.read_text()))
    report = validate_coco(path, images_dir, decode=decode, progress=printer(f"kdsweep: validating {path.name}"))
    if report.problems:  # one line: the first problem (it names id, field and fix), then the count
        first = report.problems[0].removeprefix(f"{path.name}: ")
        more = report.num_problems - 1
        rest = f" (and {more} more problem(s); `kdsweep data check {path}` lists them)" if more else ""
        raise DataError(f"{path}: {first}{rest}")
    if stamps:
        stamps[-1].parent.mkdir(parents=True, exist_ok=True)
        stamps[-1].write_text(json.dumps(dataclasses.asdict(report)))
    return report
