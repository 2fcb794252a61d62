"""The data pipeline, measured side by side on this machine: loader speed, padding, memory.

Three measures, each old against new in one run:

* **images/s** of the training loader over synthetic JPEGs at COCO's sizes (640x480 and 480x640,
  70 % landscape as in COCO): the loader as it was (PIL decode, float conversion in the training
  process), and the new one (:func:`kdsweep.data.loader.build_loaders`: torchvision decode to
  uint8) with 0, 1 and 3 loader processes. What the training loop waits for; the float
  conversion the old loader did is then done on the device (timed apart, on this CPU).
* **padding**: the share of padded pixels in batches of ``--batch`` images after the detector's
  resize to 800/1333 and its padding to a multiple of 32, without and with aspect-ratio grouping.
* **validation**: images/s of the image check before training, a full decode (``kdsweep data
  check``) and headers only (a launch), on one thread and on one per CPU.
* **RSS** of building the training dataset in a fresh process, from a synthetic COCO-train-sized
  annotation file (118,287 images, ~860k boxes with polygons, ~270 MB of JSON): the old dataset
  (the whole JSON as Python objects) against the new one (the compact cache, memory-mapped), and
  the new one again after reading every image's targets.

::

    python benchmarks/bench_loader.py            # full size (~10 min on 2 cores, the file is cached)
    python benchmarks/bench_loader.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from kdsweep import paths as kdsweep_paths
from kdsweep.config import ExperimentConfig, TrainConfig
from kdsweep.data.annotations import clipped_xyxy, ensure_compact, load_compact
from kdsweep.data.batching import GroupedBatchSampler, aspect_ratio_groups, padding_ratio
from kdsweep.data.dataset import collate
from kdsweep.data.image_check import check_images
from kdsweep.data.loader import build_loaders
from kdsweep.train.engine import images_to

LANDSCAPE_SHARE = 0.7  # COCO train2017: about 70 % of the images are wider than tall
COCO_TRAIN_IMAGES = 118_287
BOXES_PER_IMAGE = 7.3  # COCO train2017: 860,001 boxes / 118,287 images


# ------------------------------------------------------------------------------- the old loader
class OldCocoDetection(torch.utils.data.Dataset):
    """The training dataset as it was before the compact annotations (kept here to measure
    against): the whole JSON as Python objects, a PIL decode, float32 conversion in the loader."""

    def __init__(self, ann_path: str | Path, images_dir: str | Path) -> None:
        self.images_dir = Path(images_dir)
        self.dataset = json.loads(Path(ann_path).read_text())
        cats = sorted(self.dataset["categories"], key=lambda c: c["id"])
        cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.images = sorted(self.dataset["images"], key=lambda im: im["id"])
        boxes: dict[Any, list[tuple[list[float], int]]] = {im["id"]: [] for im in self.images}
        sizes = {im["id"]: (im["width"], im["height"]) for im in self.images}
        for ann in self.dataset["annotations"]:
            if ann["image_id"] not in boxes or ann.get("iscrowd", 0):
                continue
            box = clipped_xyxy(ann["bbox"], *sizes[ann["image_id"]])
            if box is not None:
                boxes[ann["image_id"]].append((box, cat_to_label[ann["category_id"]]))
        self._boxes = boxes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.images[index]
        with Image.open(self.images_dir / info["file_name"]) as handle:
            array = np.array(handle.convert("RGB"), dtype=np.uint8)
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div_(255.0)
        items = self._boxes[info["id"]]
        return image, {"boxes": torch.tensor([b for b, _ in items], dtype=torch.float32).reshape(-1, 4),
                       "labels": torch.tensor([l for _, l in items], dtype=torch.int64), "image_id": info["id"]}


# ---------------------------------------------------------------------------------- synthetic data
def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs at COCO's sizes (70 % 640x480, else 480x640) and their annotation file."""
    ann = folder / "ann.json"
    if ann.is_file():
        return ann
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        w, h = (640, 480) if rng.random() < LANDSCAPE_SHARE else (480, 640)
        # smooth noise compresses like a photo (a flat image would decode unrealistically fast)
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
        pixels = np.clip(pixels.astype(np.int16) + rng.integers(-12, 12, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": w, "height": h})
        for _ in range(3):
            x, y = float(rng.uniform(0, w - 60)), float(rng.uniform(0, h - 60))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, 50.0, 50.0], "iscrowd": 0})
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return ann


def write_coco_sized_annotations(path: Path, n_images: int, seed: int = 0) -> Path:
    """A COCO-train-like instances file: ``n_images`` images, ~7.3 boxes each with a polygon
    (16 points), 80 categories, 1 % crowd. No image files (RSS is about the annotations)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = rng.poisson(BOXES_PER_IMAGE, n_images)
    landscape = rng.random(n_images) < LANDSCAPE_SHARE
    images = [{"license": 1, "file_name": f"{i + 1:012d}.jpg", "coco_url": f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg",
               "height": 480 if landscape[i] else 640, "width": 640 if landscape[i] else 480, "date_captured": "2013-11-14 11:18:45",
               "flickr_url": "http://farm4.staticflickr.com/0/0.jpg", "id": i + 1} for i in range(n_images)]
    anns = []
    for i, k in enumerate(counts):
        w, h = images[i]["width"], images[i]["height"]
        xy = rng.uniform(0, [w - 20, h - 20], (k, 2))
        wh = rng.uniform(4, 200, (k, 2))
        polys = np.round(rng.uniform(0, 1, (k, 32)) * np.tile(wh, 16) + np.tile(xy, 16), 2)
        for j in range(k):
            x, y = xy[j]
            bw, bh = min(wh[j, 0], w - x), min(wh[j, 1], h - y)
            anns.append({"segmentation": [polys[j].tolist()], "area": round(float(bw * bh * 0.6), 4), "iscrowd": int(rng.random() < 0.01),
                         "image_id": i + 1, "bbox": [round(float(x), 2), round(float(y), 2), round(float(bw), 2), round(float(bh), 2)],
                         "category_id": int(rng.integers(1, 81)), "id": len(anns) + 1})
    cats = [{"supercategory": "thing", "id": c, "name": f"class{c}"} for c in range(1, 81)]
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}))
    return path


# --------------------------------------------------------------------------------------- measures
def images_per_second(loader: DataLoader, batches: int) -> float:
    """Images/s of iterating ``loader`` for ``batches`` batches (after one warm-up batch)."""
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        images, _ = next(it)
        n += len(images)
    return n / (time.perf_counter() - start)


def fed_share(loader: DataLoader, batches: int, step_s: float) -> tuple[float, float]:
    """``(images/s, share of the time the training loop waited for data)`` of a loop whose step
    takes ``step_s`` seconds of *device* time: a sleep, as the CPU is free while a GPU computes."""
    it = iter(loader)
    next(it)
    wait, n, start = 0.0, 0, time.perf_counter()
    for _ in range(batches):
        t0 = time.perf_counter()
        images, _ = next(it)
        images_to(images, torch.device("cpu"))  # the old loader's float images pass through unchanged
        wait += time.perf_counter() - t0
        n += len(images)
        time.sleep(step_s)
    total = time.perf_counter() - start
    return n / total, wait / total


def loaders_to_compare(ann: Path, images: Path, batch: int) -> list[tuple[str, DataLoader]]:
    data = {"train_ann": str(ann), "val_ann": str(ann), "train_images": str(images), "val_images": str(images)}
    exp = ExperimentConfig()
    old = OldCocoDetection(ann, images)
    sampler = DistributedSampler(old, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    out = [("old: PIL, float32 in the loader, 0 processes", DataLoader(old, batch_size=batch, sampler=sampler, collate_fn=collate, drop_last=True))]
    for workers in (0, 1, 3):
        cfg = TrainConfig(batch_size=batch, loader_workers=workers, hflip=0.5, aspect_grouping=3)
        out.append((f"new: torchvision uint8 + flip, {workers} loader process(es)", build_loaders(data, exp, cfg, rank=0, world=1).train))
    return out


def loader_speed(ann: Path, images: Path, batch: int, batches: int) -> list[tuple[str, float]]:
    rows = [(name, images_per_second(loader, batches)) for name, loader in loaders_to_compare(ann, images, batch)]
    # what moved to the device: uint8 -> float32 / 255 (timed here on this CPU)
    dataset = loaders_to_compare(ann, images, batch)[1][1].dataset
    sample = [dataset[i][0] for i in range(batch)]
    start = time.perf_counter()
    for _ in range(batches):
        images_to(sample, torch.device("cpu"))
    rows.append(("  (the float conversion, now on the device: on this CPU)", batch * batches / (time.perf_counter() - start)))
    return rows


def validation_speed(images: Path, repeat: int) -> list[tuple[str, float]]:
    """Images/s of the validation's image check (:mod:`kdsweep.data.image_check`): a full decode
    (``kdsweep data check``) or headers only (a launch), in one process or in every CPU's."""
    files = sorted(str(f) for f in images.iterdir()) * repeat
    rows = []
    for decode in (True, False):
        for workers in (1, os.cpu_count() or 1):
            start = time.perf_counter()
            results = check_images(files, decode=decode, workers=workers)
            assert all(isinstance(r, tuple) for r in results)
            what = "full decode" if decode else "headers only"
            rows.append((f"{what}, {workers} thread(s)", len(files) / (time.perf_counter() - start)))
    return rows


def resized_size(width: int, height: int, min_size: int = 800, max_size: int = 1333) -> tuple[int, int]:
    """``(h, w)`` of an image after torchvision's GeneralizedRCNNTransform resize (before padding)."""
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return round(height * scale), round(width * scale)


def padding(n: int, batch: int, seed: int = 0) -> list[tuple[str, float]]:
    rng = np.random.default_rng(seed)
    sizes_wh = [(640, 480) if rng.random() < LANDSCAPE_SHARE else (480, 640) for _ in range(n)]
    sizes = [resized_size(w, h) for w, h in sizes_wh]
    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    plain = list(torch.utils.data.BatchSampler(sampler, batch, drop_last=True))
    grouped = list(GroupedBatchSampler(sampler, aspect_ratio_groups([w / h for w, h in sizes_wh], 3), batch))
    return [(f"plain batches of {batch}", padding_ratio(sizes, plain)), (f"grouped batches of {batch} (k=3)", padding_ratio(sizes, grouped)),
            ("plain, padded to /32", padding_ratio(sizes, plain, 32)), ("grouped, padded to /32", padding_ratio(sizes, grouped, 32))]


RSS_PROBE = r"""
import json, resource, sys
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
import torch, numpy
sys.path.insert(0, sys.argv[3])
from bench_loader import OldCocoDetection
from kdsweep.data.dataset import CocoDetection
before = rss_mb()
if sys.argv[1] == "old":
    ds = OldCocoDetection(sys.argv[2], "/nonexistent")
    after = rss_mb(); touched = after
else:
    ds = CocoDetection(sys.argv[2], "/nonexistent")
    after = rss_mb()
    n = sum(ds.annotations.targets(i)[0].shape[0] for i in range(len(ds)))
    touched = rss_mb()
print(json.dumps({"images": len(ds), "built": after - before, "touched": touched - before}))
"""


def rss(ann: Path) -> list[tuple[str, dict[str, float]]]:
    """RSS growth of building the train dataset in a fresh process, old and new (the compact
    cache is written first, by this process, as the launcher does before workers start)."""
    start = time.perf_counter()
    load_compact(ann, use_cache=False)  # the conversion a launch does once (timed even when cached)
    converted = time.perf_counter() - start
    ensure_compact(ann)
    out = []
    for kind in ("old", "new"):
        proc = subprocess.run([sys.executable, "-c", RSS_PROBE, kind, str(ann), str(Path(__file__).parent)],
                              capture_output=True, text=True, check=True)
        out.append((kind, json.loads(proc.stdout.strip().splitlines()[-1])))
    out.append(("conversion to the cache, once (s)", {"seconds": converted}))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds): the CPU smoke version")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (the paper preset: 2 per GPU)")
    parser.add_argument("--step-ms", type=float, default=60.0,
                        help="device time of one training step in the fed measure (default 60: about an A100's RetinaNet "
                             "R50 step of 2 images at 800/1333 under AMP, an assumption, not measured here)")
    parser.add_argument("--ann-images", type=int, help=f"images in the annotation file of the RSS measure (default {COCO_TRAIN_IMAGES:,})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 3 processes on 2 cores, on purpose
    work = kdsweep_paths.home() / "bench_loader"
    n_jpegs, batches = (24, 4) if args.quick else (240, 60)
    ann_images = args.ann_images or (2000 if args.quick else COCO_TRAIN_IMAGES)
    print(f"machine: {os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)

    ann = write_images(work / f"jpegs-{n_jpegs}", n_jpegs)
    print(f"\nloader speed ({n_jpegs} JPEGs 640x480 / 480x640, batch {args.batch}, {batches} batches)")
    speeds = loader_speed(ann, ann.parent / "images", args.batch, batches)
    base = speeds[0][1]
    for name, value in speeds:
        print(f"  {name:58s} {value:8.1f} img/s  x{value / base:5.2f}")

    print(f"\nfed to a device whose step of {args.batch} images takes {args.step_ms:.0f} ms (the CPU idle meanwhile)")
    rows = [(name, *fed_share(loader, batches, args.step_ms / 1000)) for name, loader in loaders_to_compare(ann, ann.parent / "images", args.batch)]
    for name, rate, waiting in rows:
        print(f"  {name:58s} {rate:8.1f} img/s  x{rate / rows[0][1]:5.2f}  waiting for data {100 * waiting:4.1f} %")

    print(f"\nvalidation of the images ({10 * n_jpegs} checks of the same JPEGs, page cache warm; threads)")
    checks = validation_speed(ann.parent / "images", 10)
    for name, value in checks:
        print(f"  {name:58s} {value:8.0f} img/s  x{value / checks[0][1]:5.2f}")

    print(f"\npadding after resizing to 800/1333 (COCO's 70/30 landscape/portrait mix, 5000 images)")
    for name, value in padding(5000, args.batch):
        print(f"  {name:58s} {100 * value:6.1f} % of the pixels")

    big = write_coco_sized_annotations(work / f"coco-like-{ann_images}.json", ann_images)
    size_mb = big.stat().st_size / 2**20
    print(f"\nRSS of the training dataset in a fresh process ({ann_images:,} images, {size_mb:.0f} MB of JSON)")
    for name, value in rss(big):
        if "seconds" in value:
            print(f"  {name:58s} {value['seconds']:8.1f}")
        else:
            print(f"  {name + ' dataset built':58s} {value['built']:8.0f} MB")
            if name == "new":
                print(f"  {'new, after reading every image targets':58s} {value['touched']:8.0f} MB")


if __name__ == "__main__":
    main()
