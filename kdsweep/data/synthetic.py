"""Procedurally generated detection dataset: a small-object, cluttered stand-in for VisDrone.

Layout written by :func:`generate` (COCO instances format)::

    out/
      train.json, val.json      # keys: images, annotations, categories, info
      images/train_000001.jpg   # RGB JPEG, size x size pixels
      .kdsweep-synth            # marker: this folder was made here (safe to replace)

What an image contains (all randomness from a numpy Generator seeded by (seed, split, index),
so the same seed gives byte-identical JSON and images):

* a cluttered background: linear colour gradient + low-frequency colour noise + pixel noise,
  random thin lines and soft blobs;
* **distractors** (never annotated): irregular 5-9 sided polygons and thin bars, textured like
  the objects, behind and in front of the objects;
* 3-12 **objects** of the classes :data:`CLASSES`, each with a random colour, texture
  (solid, stripes, checker, noise), a lighting gradient, rotation and aspect ratio;
* **occlusion**: objects overlap each other (mostly large behind small) and some are partly
  covered by unannotated occluders. The box is the object's *full* extent (as if unoccluded),
  like COCO/VisDrone amodal boxes. An object with more than :data:`MAX_OCCLUDED` (50 %) of its
  pixels covered is not annotated (it would be an unreasonable target); the ``info.stats`` of
  each JSON counts drawn, annotated, skipped and partly occluded objects and distractors.

Two styles (``style=``): ``cluttered`` (the default, above) stands in for VisDrone; ``simple``
keeps the classes, textures, rotation and the long-tailed scales but draws no distractors and no
occluders, 2-8 objects per image and no object under 5 px radius. From-scratch CPU detectors
learn ``simple`` within minutes, which is what the ``quick`` preset needs for a baseline with a
meaningful AP; ``cluttered`` needs far more training.

Scale distribution is long-tailed: the object radius is drawn from a mixture (about 58 %
tiny/small, 30 % medium, 12 % large), which gives about 65 % COCO-small boxes
(area < 32^2 px), 26 % medium and 8 % large at ``size=192`` (the large share shrinks with
``size``; below ``size`` 112 no large boxes are drawn).
Each annotation has ``bbox`` [x, y, w, h] (floats, 2 decimals), ``area`` (w*h), ``iscrowd`` 0
and ``visibility`` (fraction of the object's pixels that stay visible, 0.5-1).
"""

from __future__ import annotations

import fcntl
import json
import math
import multiprocessing
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from kdsweep import paths
from kdsweep.config import DataConfig

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
TEXTURES = ("solid", "stripes", "checker", "noise")
SPLIT_CODES = {"train": 0, "val": 1}
MAX_OCCLUDED = 0.5
SUPERSAMPLE = 3
JPEG_QUALITY = 90
MARKER = ".kdsweep-synth"
FORMAT_VERSION = 1
STYLES = ("cluttered", "simple")

Polygon = tuple[np.ndarray, int]  # ((K, 2) float xy vertices in image pixels, mask fill 255 or 0)


# --------------------------------------------------------------------------- shapes


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    """(n, 2) vertices of a regular n-gon on the unit circle."""
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_outline(cls: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons of class ``cls`` inside the unit disc, as (vertices (K, 2), fill) pairs.

    Fill 255 adds to the mask, 0 cuts a hole (drawn in order).
    """
    if cls == "circle":
        return [(_regular(40), 255)]
    if cls == "square":
        return [(_regular(4, math.pi / 4), 255)]
    if cls == "triangle":
        return [(_regular(3, -math.pi / 2), 255)]
    if cls == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = _regular(10, -math.pi / 2) * np.where(np.arange(10) % 2 == 0, 1.0, inner)[:, None]
        return [(pts, 255)]
    if cls == "cross":
        a = rng.uniform(0.22, 0.34)  # half arm width
        b = 1.0 / math.sqrt(1 + a * a)  # arm tip so corners lie on the unit circle
        pts = np.array(
            [[a, b], [a, a], [b, a], [b, -a], [a, -a], [a, -b],
             [-a, -b], [-a, -a], [-b, -a], [-b, a], [-a, a], [-a, b]]
        )
        return [(pts, 255)]
    if cls == "ring":
        return [(_regular(40), 255), (_regular(40) * rng.uniform(0.45, 0.65), 0)]
    raise ValueError(f"unknown shape class {cls!r}")


def _irregular(rng: np.random.Generator) -> np.ndarray:
    """(K, 2) vertices of an irregular star-convex 5-9 gon inside the unit disc (a distractor)."""
    n = int(rng.integers(5, 10))
    t = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = rng.uniform(0.3, 1.0, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _bar(length: float, width: float) -> np.ndarray:
    """(4, 2) vertices of a centred bar along x (a thin line distractor when width is small)."""
    return np.array([[-length, -width], [length, -width], [length, width], [-length, width]]) / 2


def _place(unit: np.ndarray, cx: float, cy: float, radius: float, angle: float,
           aspect: float = 1.0) -> np.ndarray:
    """Scale unit vertices by ``radius`` (y also by ``aspect``), rotate by ``angle``, move to (cx, cy)."""
    pts = unit * np.array([radius, radius * aspect])
    c, s = math.cos(angle), math.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return rot + np.array([cx, cy])


# --------------------------------------------------------------------------- rendering


def _alpha(polys: list[Polygon], size: int) -> tuple[np.ndarray, int, int] | None:
    """Anti-aliased coverage of ``polys`` clipped to the image.

    Returns (alpha (h, w) float32 in [0, 1], x0, y0) of the patch, or None when off-image.
    """
    allpts = np.concatenate([p for p, _ in polys])
    x0, y0 = (max(0, int(math.floor(v))) for v in allpts.min(axis=0))
    x1, y1 = (min(size, int(math.ceil(v))) for v in allpts.max(axis=0))
    if x1 <= x0 or y1 <= y0:
        return None
    w, h = x1 - x0, y1 - y0
    mask = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    for pts, fill in polys:
        local = (pts - np.array([x0, y0])) * SUPERSAMPLE
        draw.polygon([tuple(v) for v in local.tolist()], fill=fill)
    small = mask.reduce(SUPERSAMPLE) if SUPERSAMPLE > 1 else mask
    return np.asarray(small, dtype=np.float32) / 255.0, x0, y0


def _contrasting_colour(rng: np.random.Generator, ref: np.ndarray, min_dist: float = 70.0) -> np.ndarray:
    """A random RGB colour (3,) at least ``min_dist`` away from ``ref`` (falls back to its inverse)."""
    for _ in range(8):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - ref) >= min_dist:
            return colour
    return 255.0 - ref


def _texture(rng: np.random.Generator, h: int, w: int, ref: np.ndarray) -> np.ndarray:
    """(h, w, 3) float32 texture (solid/stripes/checker/noise, with a lighting gradient).

    Its main colour contrasts with ``ref`` (the mean colour underneath).
    """
    c1 = _contrasting_colour(rng, ref)
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "solid":
        tex = np.broadcast_to(c1, (h, w, 3)).astype(np.float32)
    elif kind == "stripes":
        c2 = _contrasting_colour(rng, c1, 50.0)
        period = rng.uniform(3.0, max(4.0, min(h, w) / 2))
        phi = rng.uniform(0, math.pi)
        on = ((xx * math.cos(phi) + yy * math.sin(phi)) % period) < period / 2
        tex = np.where(on[..., None], c1, c2).astype(np.float32)
    elif kind == "checker":
        c2 = _contrasting_colour(rng, c1, 50.0)
        cell = int(rng.integers(2, max(3, min(h, w) // 3) + 1))
        on = ((xx // cell + yy // cell) % 2) == 0
        tex = np.where(on[..., None], c1, c2).astype(np.float32)
    else:
        sigma = rng.uniform(15.0, 45.0)
        tex = (c1 + rng.normal(0.0, sigma, (h, w, 3))).astype(np.float32)
    psi = rng.uniform(0, 2 * math.pi)
    gain = rng.uniform(-0.35, 0.35)
    ramp = (xx * math.cos(psi) + yy * math.sin(psi)) / max(h, w, 1)
    return tex * (1.0 + gain * (ramp - ramp.mean()))[..., None]


def _composite(canvas: np.ndarray, polys: list[Polygon], rng: np.random.Generator,
               owner: np.ndarray | None = None, owner_id: int = -1) -> int:
    """Paint textured ``polys`` onto ``canvas`` (H, W, 3) float32; mark covered pixels in ``owner``.

    Returns the number of pixels the shape covers (alpha >= 0.5), 0 when off-image.
    """
    rendered = _alpha(polys, canvas.shape[0])
    if rendered is None:
        return 0
    alpha, x0, y0 = rendered
    h, w = alpha.shape
    patch = canvas[y0:y0 + h, x0:x0 + w]
    tex = _texture(rng, h, w, patch.reshape(-1, 3).mean(axis=0))
    a = alpha[..., None]
    patch *= 1.0 - a
    patch += tex * a
    solid = alpha >= 0.5
    if owner is not None:
        owner[y0:y0 + h, x0:x0 + w][solid] = owner_id
    return int(solid.sum())


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 cluttered background: gradient + smooth colour noise + pixel noise."""
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    phi = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(phi) + yy * math.sin(phi)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    canvas = c1 + (c2 - c1) * t[..., None]
    grid = int(rng.integers(3, 9))
    coarse = rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    canvas += (smooth - 127.5) / 127.5 * rng.uniform(10.0, 50.0)
    canvas += rng.normal(0.0, rng.uniform(0.0, 10.0), (size, size, 1))
    return canvas.astype(np.float32)


def _clutter(canvas: np.ndarray, rng: np.random.Generator, owner: np.ndarray | None,
             count: int) -> int:
    """Draw ``count`` unannotated distractors (irregular polygons, thin bars); returns how many."""
    size = canvas.shape[0]
    drawn = 0
    for _ in range(count):
        cx, cy = rng.uniform(-0.05, 1.05, 2) * size
        angle = rng.uniform(0, 2 * math.pi)
        if rng.random() < 0.5:
            radius = _sample_radius(rng, size)
            pts = _place(_irregular(rng), cx, cy, radius, angle)
        else:
            length = rng.uniform(0.1, 0.6) * size
            pts = _place(_bar(1.0, rng.uniform(0.6, 2.5) / length), cx, cy, length, angle)
        drawn += _composite(canvas, [(pts, 255)], rng, owner, -1) > 0
    return drawn


# --------------------------------------------------------------------------- objects


def _sample_radius(rng: np.random.Generator, size: int, min_radius: float = 3.5) -> float:
    """Object radius in px from a long-tailed mixture (tiny/small, medium, large)."""
    u = rng.random()
    large_hi = 0.45 * size
    if u < 0.58:
        return float(math.exp(rng.uniform(math.log(min_radius), math.log(15.0))))
    if u < 0.88 or large_hi < 50.0:
        return float(rng.uniform(16.0, min(44.0, large_hi)))
    return float(rng.uniform(50.0, large_hi))


def _make_object(rng: np.random.Generator, size: int, min_radius: float = 3.5) -> dict[str, Any]:
    """A random object: class index, polygons in image px and its full-extent box (x0, y0, x1, y1)."""
    label = int(rng.integers(len(CLASSES)))
    radius = _sample_radius(rng, size, min_radius)
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * math.pi)
    aspect = rng.uniform(0.7, 1.0)
    polys = [(_place(unit, cx, cy, radius, angle, aspect), fill)
             for unit, fill in _unit_outline(CLASSES[label], rng)]
    outer = polys[0][0]
    x0, y0 = np.clip(outer.min(axis=0), 0, size)
    x1, y1 = np.clip(outer.max(axis=0), 0, size)
    return {"label": label, "radius": radius, "centre": (cx, cy), "polys": polys,
            "box": (float(x0), float(y0), float(x1), float(y1))}


def _occluder(rng: np.random.Generator, obj: dict[str, Any]) -> list[Polygon]:
    """An unannotated irregular polygon or bar overlapping the edge of ``obj``."""
    cx, cy = obj["centre"]
    r = obj["radius"]
    direction = rng.uniform(0, 2 * math.pi)
    dist = r * rng.uniform(0.6, 1.2)
    ox, oy = cx + dist * math.cos(direction), cy + dist * math.sin(direction)
    if rng.random() < 0.6:
        pts = _place(_irregular(rng), ox, oy, r * rng.uniform(0.4, 0.9), rng.uniform(0, 2 * math.pi))
    else:
        pts = _place(_bar(1.0, rng.uniform(0.15, 0.35)), ox, oy, r * rng.uniform(1.2, 2.4),
                     rng.uniform(0, 2 * math.pi))
    return [(pts, 255)]


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator of image ``index`` of ``split`` (order- and process-independent)."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], index]))


def render_image(seed: int, split: str, index: int, size: int,
                 style: str = "cluttered") -> tuple[np.ndarray, list[dict[str, Any]], dict[str, int]]:
    """Render one image deterministically (``style``: see the module docstring).

    Returns:
        image: (size, size, 3) uint8 RGB array.
        objects: annotated objects, each ``{"label": 0..K-1, "box": (x0, y0, x1, y1) px,
            "visibility": float}``.
        stats: counts ``objects_drawn``, ``objects_annotated``, ``objects_skipped_occluded``,
            ``objects_partly_occluded``, ``distractors_drawn``, ``occluders_drawn``.
    """
    if style not in STYLES:
        raise ValueError(f"synth: style {style!r} is unknown; use one of {', '.join(STYLES)}")
    cluttered = style == "cluttered"
    rng = _image_rng(seed, split, index)
    canvas = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)
    distractors = _clutter(canvas, rng, None, int(rng.integers(3, 10))) if cluttered else 0
    count = int(rng.integers(3, 13)) if cluttered else int(rng.integers(2, 9))
    objects = [_make_object(rng, size, 3.5 if cluttered else 5.0) for _ in range(count)]
    # mostly large behind small (like an overhead scene), with some shuffling
    keys = [-math.log(o["radius"]) + rng.normal(0.0, 0.5) for o in objects]
    objects = [objects[i] for i in np.argsort(keys, kind="stable")]
    pixels = [_composite(canvas, o["polys"], rng, owner, i) for i, o in enumerate(objects)]
    occluders = 0
    for obj in objects if cluttered else ():
        if rng.random() < 0.25:
            occluders += _composite(canvas, _occluder(rng, obj), rng, owner, -1) > 0
    if cluttered:
        distractors += _clutter(canvas, rng, owner, int(rng.integers(0, 4)))
    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(objects))
    kept: list[dict[str, Any]] = []
    partly = 0
    for i, obj in enumerate(objects):
        vis = visible[i] / pixels[i] if pixels[i] else 0.0
        if vis < 1.0 - MAX_OCCLUDED:
            continue
        partly += vis < 0.95
        kept.append({"label": obj["label"], "box": obj["box"], "visibility": round(float(vis), 2)})
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    stats = {
        "objects_drawn": len(objects),
        "objects_annotated": len(kept),
        "objects_skipped_occluded": len(objects) - len(kept),
        "objects_partly_occluded": int(partly),
        "distractors_drawn": int(distractors),
        "occluders_drawn": int(occluders),
    }
    return image, kept, stats


# --------------------------------------------------------------------------- dataset writing


def _file_name(split: str, index: int) -> str:
    return f"{split}_{index + 1:06d}.jpg"


def _write_one(job: tuple[int, str, int, int, str, str]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pool worker: render image ``index`` and save it as JPEG under ``images_dir``."""
    seed, split, index, size, images_dir, style = job
    image, objects, stats = render_image(seed, split, index, size, style)
    Image.fromarray(image).save(Path(images_dir) / _file_name(split, index), "JPEG", quality=JPEG_QUALITY)
    return objects, stats


class _Progress:
    """A counter line on stderr: ``synth train: 120/600``."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled and total > 0
        self.tty = sys.stderr.isatty()
        self.step = max(1, total // (100 if self.tty else 10))

    def update(self, done: int) -> None:
        if self.enabled and (done % self.step == 0 or done == self.total):
            end = "\n" if done == self.total or not self.tty else ""
            print(f"\r{self.label}: {done}/{self.total}", end=end, file=sys.stderr, flush=True)


def _coco_split(split: str, results: list[tuple[list[dict[str, Any]], dict[str, int]]],
                size: int, seed: int, style: str = "cluttered") -> dict[str, Any]:
    """COCO instances dict of one split from per-image results (ids contiguous from 1)."""
    images, annotations = [], []
    totals = {k: 0 for k in ("objects_drawn", "objects_annotated", "objects_skipped_occluded",
                             "objects_partly_occluded", "distractors_drawn", "occluders_drawn")}
    for index, (objects, stats) in enumerate(results):
        image_id = index + 1
        images.append({"id": image_id, "file_name": _file_name(split, index), "width": size, "height": size})
        for k in totals:
            totals[k] += stats[k]
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            w, h = round(x1 - x0, 2), round(y1 - y0, 2)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"] + 1,
                "bbox": [round(x0, 2), round(y0, 2), w, h], "area": round(w * h, 2),
                "iscrowd": 0, "visibility": obj["visibility"],
            })
    return {
        "info": {"description": "kdsweep synthetic shapes (procedural, small-object heavy)",
                 "version": FORMAT_VERSION, "split": split, "seed": seed, "size": size,
                 **({"style": style} if style != "cluttered" else {}),
                 "max_occluded": MAX_OCCLUDED, "stats": totals},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }


def _default_workers(total: int) -> int:
    """2 processes for big jobs (not inside a daemonic process, which may not fork children)."""
    if total < 64 or multiprocessing.current_process().daemon:
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def _check_replaceable(out: Path) -> None:
    """Raise FileExistsError unless ``out`` is absent, empty or an earlier synthetic dataset."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"synth: {out} exists and is not a folder; choose another --out")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(
            f"synth: {out} is not empty and not a kdsweep synthetic dataset; choose another --out"
        )


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing an earlier dataset there."""
    _check_replaceable(out)
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def generate(out: str | Path, *, train: int = 600, val: int = 150, size: int = 192, seed: int = 0,
             progress: bool = True, workers: int | None = None, style: str = "cluttered") -> dict[str, Path]:
    """Write a synthetic detection dataset to ``out`` (see the module docstring for its content).

    The data is generated in a hidden temp folder beside ``out`` and renamed into place at the
    end, so ``out`` is either absent/unchanged or complete. ``out`` may be missing, empty or an
    earlier synthetic dataset (replaced); anything else raises FileExistsError.

    Args:
        out: target folder.
        train, val: number of images per split (>= 0; an empty split still gets its JSON).
        size: image side in px (>= 64).
        seed: >= 0; the same seed gives byte-identical JSON and images.
        progress: print a counter line per split to stderr.
        workers: processes to render with (default: 2 for large jobs, else 1); the output does
            not depend on it.
        style: ``cluttered`` (VisDrone-like, default) or ``simple`` (no distractors/occluders).

    Returns:
        ``{"train": out/train.json, "val": out/val.json, "images": out/images}`` (absolute).
    """
    if style not in STYLES:
        raise ValueError(f"synth: style {style!r} is unknown; use one of {', '.join(STYLES)}")
    if train < 0 or val < 0 or size < 64 or seed < 0:
        raise ValueError(f"synth: need train >= 0, val >= 0, size >= 64, seed >= 0; got "
                         f"train={train}, val={val}, size={size}, seed={seed}")
    out = Path(out).expanduser().resolve()
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    nproc = workers if workers is not None else _default_workers(train + val)
    pool = multiprocessing.get_context("fork").Pool(nproc) if nproc > 1 else None
    try:
        (tmp / "images").mkdir(parents=True)
        for split, count in (("train", train), ("val", val)):
            jobs = [(seed, split, i, size, str(tmp / "images"), style) for i in range(count)]
            bar = _Progress(f"synth {split}", count, progress)
            results = []
            mapped = pool.imap(_write_one, jobs, chunksize=8) if pool else map(_write_one, jobs)
            for result in mapped:
                results.append(result)
                bar.update(len(results))
            coco = _coco_split(split, results, size, seed, style)
            (tmp / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
        params = {"version": FORMAT_VERSION, "train": train, "val": val, "size": size, "seed": seed}
        if style != "cluttered":
            params["style"] = style
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return {"train": out / "train.json", "val": out / "val.json", "images": out / "images"}


# --------------------------------------------------------------------------- embedded default


def synth_name(cfg: DataConfig) -> str:
    """Folder name of the synthetic dataset for ``cfg``: ``synth-{size}-{train}-{val}-s{seed}[-{style}]``."""
    suffix = "" if cfg.synth_style == "cluttered" else f"-{cfg.synth_style}"
    return f"synth-{cfg.synth_size}-{cfg.synth_train}-{cfg.synth_val}-s{cfg.synth_seed}{suffix}"


def _is_complete(out: Path) -> bool:
    return (out / MARKER).is_file() and (out / "train.json").is_file() and (out / "val.json").is_file()


def ensure_synthetic(cfg: DataConfig) -> Path:
    """Folder of the synthetic dataset for ``cfg`` under ``KDSWEEP_HOME``, generated on first use.

    Safe with concurrent callers (e.g. several Ray workers): generation runs under an exclusive
    ``fcntl.flock`` on ``<name>.lock`` beside the folder, and completeness is checked again after
    the lock is taken. Leftover temp folders of crashed runs of the same name are removed then.
    """
    out = paths.synth_data_dir(synth_name(cfg))
    if _is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _is_complete(out):
                for stale in out.parent.glob(f".{out.name}.tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                generate(out, train=cfg.synth_train, val=cfg.synth_val, size=cfg.synth_size,
                         seed=cfg.synth_seed, progress=True, style=cfg.synth_style)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out
