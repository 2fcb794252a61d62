"""Evaluation at scale: gathering the detections (old pickled objects vs packed rows) and COCOeval
(pycocotools vs faster-coco-eval), time and peak memory side by side, one run.

Data: a synthetic COCO ground truth (default 5,000 images of 640 x 480, COCO's 80 category ids,
1-10 boxes per image, small / medium / large mixed, ~1 % crowd) and ``--dets`` detections per image
as torchvision outputs (three jittered copies of every object, mostly with the right label, the
rest false positives with lower scores). Images are sharded round-robin over ``--world`` ranks.

(a) gather + unpack, one rank's view (the ranks pack their shards in parallel; the collective's
transfer itself is not timed, its bytes are shown). Every rank's work is simulated in one
process; a collective is replaced by the copies it leaves on the receiving rank:

* old (``all_gather_object``, removed in 842834c): each rank turns its outputs into COCO records
  (``to_coco_detections``) and pickles ``(seen, records)``; every rank receives all ``world``
  pickles (byte buffers padded to the longest, as ``all_gather_object`` does) and unpickles them.
* new (:func:`~kdsweep.train.collectives.gather_rows`): each rank packs its outputs into float64
  rows (``detection_rows``) and pads them to the longest count; only rank 0 receives the
  ``world`` buckets and concatenates them (both timed as "receive"; the buckets are freed when
  ``gather_rows`` returns), then makes the records (``records_from_rows``).

(b) ``coco_stats`` over all images with each evaluator (its whole cost: loading the results,
indexing, evaluate, accumulate, summarize), and the AP each reports.

Peak memory: each measurement runs in a forked child (the parent's data shared, its objects
frozen out of the garbage collector); the peak is the child's high-water resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` where allowed) minus its resident set at the
start and minus the library code it pages in (``RssFile`` growth: file-backed pages are not
copied at fork), so it counts what the measured code allocated: Python objects and tensors alike
(Linux; ``nan`` elsewhere).
Times and peaks are medians over ``--repeats`` children. Example::

    python benchmarks/bench_eval.py                 # 5,000 images, 100 detections each
    python benchmarks/bench_eval.py --quick         # 200 images, 20 detections each
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import multiprocessing
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pycocotools.coco import COCO  # noqa: E402

from kdsweep.train.evaluation import (  # noqa: E402
    EVALUATORS,
    STAT_NAMES,
    coco_stats,
    detection_rows,
    records_from_rows,
    to_coco_detections,
)

COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})  # 80 ids
WIDTH, HEIGHT = 640, 480
SIDE_BINS = ((6.0, 31.0), (33.0, 95.0), (97.0, 420.0))  # sqrt(area) in COCO's small / medium / large
SIDE_P = (0.4, 0.35, 0.25)
MiB = 2**20

Outputs = list[tuple[int, dict[str, torch.Tensor]]]


# ------------------------------------------------------------------------------------ the data
def synthetic_coco(images: int, dets: int, seed: int = 0) -> tuple[dict, Outputs]:
    """A COCO ground-truth dataset dict and per-image torchvision outputs.

    Shape:
        - each output: ``boxes`` (dets, 4) float32 xyxy, ``scores`` (dets,) float32, ``labels``
          (dets,) int64 in 1..80 (label ``l`` is ``COCO_CATEGORY_IDS[l - 1]``).
    """
    rng = np.random.default_rng(seed)
    n_cats = len(COCO_CATEGORY_IDS)
    images_out, anns, outputs = [], [], []
    for image_id in range(1, images + 1):
        images_out.append({"id": image_id, "width": WIDTH, "height": HEIGHT, "file_name": f"{image_id:012d}.jpg"})
        k = int(rng.integers(1, 11))
        bins = rng.choice(3, size=k, p=SIDE_P)
        lo, hi = np.array(SIDE_BINS)[bins].T
        side = np.exp(rng.uniform(np.log(lo), np.log(hi)))
        w = np.minimum(side * rng.uniform(0.8, 1.25, k), WIDTH - 1)
        h = np.minimum(side * rng.uniform(0.8, 1.25, k), HEIGHT - 1)
        x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
        labels = rng.integers(1, n_cats + 1, k)
        crowd = rng.random(k) < 0.01
        for j in range(k):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[labels[j] - 1],
                         "bbox": [float(x[j]), float(y[j]), float(w[j]), float(h[j])], "area": float(w[j] * h[j]),
                         "iscrowd": int(crowd[j])})
        # detections: three jittered copies of each object (noise 5, 10, 20 % of its size) ...
        copies = min(3 * k, dets)
        src = np.arange(copies) % k
        noise = np.array([0.05, 0.1, 0.2])[np.arange(copies) // k][:, None]
        gt_xyxy = np.stack([x, y, x + w, y + h], 1)[src]
        size = np.stack([w, h, w, h], 1)[src]
        boxes_t = gt_xyxy + rng.normal(0.0, 1.0, (copies, 4)) * noise * size
        labels_t = np.where(rng.random(copies) < 0.9, labels[src], rng.integers(1, n_cats + 1, copies))
        scores_t = rng.uniform(0.3, 1.0, copies) * (1.0 - noise[:, 0])
        # ... and false positives for the rest, with lower scores
        fp = dets - copies
        fw, fh = rng.uniform(4, 300, fp), rng.uniform(4, 300, fp)
        fx, fy = rng.uniform(0, WIDTH - fw), rng.uniform(0, HEIGHT - np.minimum(fh, HEIGHT - 1))
        boxes = np.concatenate([boxes_t, np.stack([fx, fy, fx + fw, fy + fh], 1)])
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, WIDTH)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, HEIGHT)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)
        scores = np.concatenate([scores_t, rng.uniform(0.0, 0.5, fp)])
        order = np.argsort(-scores, kind="stable")
        outputs.append((image_id, {
            "boxes": torch.from_numpy(boxes[order].astype(np.float32)),
            "scores": torch.from_numpy(scores[order].astype(np.float32)),
            "labels": torch.from_numpy(
                np.concatenate([labels_t, rng.integers(1, n_cats + 1, fp)])[order].astype(np.int64)),
        }))
    categories = [{"id": c, "name": f"category {c}"} for c in COCO_CATEGORY_IDS]
    return {"images": images_out, "annotations": anns, "categories": categories}, outputs


def label_to_cat_id() -> dict[int, int]:
    return {label: cat for label, cat in enumerate(COCO_CATEGORY_IDS, start=1)}


# ------------------------------------------------------------------------- the measurement
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _child(fn: Callable[[], dict[str, Any]], conn: Any) -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (a forked child starts there anyway)
            f.write("5")
    except OSError:
        pass
    start_rss, start_file = _status_kib("VmRSS"), _status_kib("RssFile")
    out = fn()
    peak, end_file = _status_kib("VmHWM"), _status_kib("RssFile")
    if None in (start_rss, start_file, peak, end_file):
        out["peak_mib"] = float("nan")
    else:  # less the library code the child pages in (file-backed, not copied at fork)
        out["peak_mib"] = (peak - start_rss - (end_file - start_file)) / 1024
    conn.send(out)
    conn.close()


def measure(fn: Callable[[], dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Run ``fn`` (returning a dict of numbers) in ``repeats`` forked children; the median of each
    number, plus ``peak_mib``: what the child's resident set grew by at its peak."""
    ctx = multiprocessing.get_context("fork")
    runs = []
    for _ in range(repeats):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(fn, child))
        proc.start()
        child.close()
        runs.append(parent.recv())
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"bench_eval: a measurement child exited with {proc.exitcode}")
    return {k: (statistics.median(r[k] for r in runs) if isinstance(runs[0][k], (int, float)) else runs[0][k])
            for k in runs[0]}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# -------------------------------------------------------------------- (a) gather + unpack
def old_rank(own: Outputs, others: list[bytes], mapping: dict[int, int]) -> dict[str, Any]:
    """A rank under ``all_gather_object``: pack its shard, receive every rank's pickle, unpickle all.

    ``others``: the other ranks' pickles (made by them, in parallel)."""
    def pack() -> bytes:
        outs = [(i, {k: v.cpu() for k, v in o.items()}) for i, o in own]  # the old predict's host copy
        records = to_coco_detections((o for _, o in outs), (i for i, _ in outs), mapping)
        return pickle.dumps(([i for i, _ in outs], records))

    mine, t_pack = _timed(pack)
    payloads = [mine, *others]
    longest = max(len(p) for p in payloads)

    def receive() -> list[bytearray]:
        buffers = []
        for p in payloads:  # all_gather_object: world byte tensors of the longest size on every rank
            buf = bytearray(longest)
            buf[: len(p)] = p
            buffers.append(buf)
        return buffers

    buffers, t_receive = _timed(receive)

    def unpack() -> tuple[list[int], list[dict[str, Any]]]:
        gathered = [pickle.loads(memoryview(buf)[: len(p)]) for buf, p in zip(buffers, payloads)]
        return [i for ids, _ in gathered for i in ids], [r for _, part in gathered for r in part]

    (seen, records), t_unpack = _timed(unpack)
    return {"pack_s": t_pack, "receive_s": t_receive, "unpack_s": t_unpack,
            "received_mib": longest * len(payloads) / MiB, "records": len(records), "images": len(set(seen))}


def new_rank(own: Outputs, others: list[torch.Tensor] | None, mapping: dict[int, int]) -> dict[str, Any]:
    """A rank under :func:`gather_rows`: pack its shard into rows and pad them; the destination
    (``others`` given: the other ranks' rows) receives the padded buckets and unpacks them."""
    device = torch.device("cpu")

    def pack() -> torch.Tensor:
        return detection_rows(own, device)

    rows, t_pack = _timed(pack)
    parts = [rows, *(others or [])]
    sizes = [p.shape[0] for p in parts] if others is not None else [rows.shape[0]]
    longest = max(sizes)  # every rank knows it from the counts' all-gather

    def receive() -> torch.Tensor | None:
        padded = rows.new_zeros((longest, rows.shape[1]))
        padded[: rows.shape[0]] = rows  # the send buffer, on every rank
        if others is None:
            return None
        buckets = [padded]
        for part in parts[1:]:  # what dist.gather leaves on dst ...
            bucket = part.new_zeros((longest, part.shape[1]))
            bucket[: part.shape[0]] = part
            buckets.append(bucket)
        return torch.cat([bucket[:n] for bucket, n in zip(buckets, sizes)])  # ... and what gather_rows returns

    gathered, t_receive = _timed(receive)
    if gathered is None:
        return {"pack_s": t_pack, "receive_s": t_receive, "unpack_s": 0.0, "received_mib": 0.0, "records": 0,
                "images": 0}
    (records, seen), t_unpack = _timed(lambda: records_from_rows(gathered.cpu(), mapping))
    return {"pack_s": t_pack, "receive_s": t_receive, "unpack_s": t_unpack,
            "received_mib": longest * rows.shape[1] * rows.element_size() * len(parts) / MiB,
            "records": len(records), "images": len(seen)}


# ------------------------------------------------------------------------------ (b) COCOeval
def eval_run(gt: COCO, records: list[dict[str, Any]], evaluator: str) -> dict[str, Any]:
    stats, seconds = _timed(lambda: coco_stats(gt, records, evaluator=evaluator))
    return {"eval_s": seconds, **stats}


def _evaluators() -> list[str]:
    names = []
    for name in EVALUATORS:
        if name == "faster-coco-eval":
            try:
                import faster_coco_eval  # noqa: F401  (an optional extra)
            except ImportError:
                print("faster-coco-eval not installed (pip install 'kdsweep[fast-eval]'): its row is left out")
                continue
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="images in the ground truth")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--world", type=int, default=8, help="ranks the images are sharded over")
    parser.add_argument("--repeats", type=int, default=None, help="forked children per measurement (median); "
                        "default 3, 1 with --quick")
    parser.add_argument("--quick", action="store_true", help="a small version: 200 images, 20 detections each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.dets = min(args.images, 200), min(args.dets, 20)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.images < args.world or args.dets < 1:
        parser.error("need --images >= --world and --dets >= 1")
    torch.set_num_threads(1)  # one rank's host work; and a forked child must not inherit a busy pool

    dataset, outputs = synthetic_coco(args.images, args.dets, args.seed)
    mapping = label_to_cat_id()
    anns = dataset["annotations"]
    areas = np.array([a["area"] for a in anns])
    bins = np.bincount((areas >= 32**2).astype(int) + (areas >= 96**2).astype(int), minlength=3)
    print(f"synthetic COCO: {args.images:,} images, {len(dataset['categories'])} categories, {len(anns):,} boxes "
          f"(small {bins[0]:,}, medium {bins[1]:,}, large {bins[2]:,}; {sum(a['iscrowd'] for a in anns):,} crowd), "
          f"{args.dets} detections per image ({args.images * args.dets:,}), world {args.world}, "
          f"median of {repeats} run(s), torch threads 1")

    shards = [[out for j, out in enumerate(outputs) if j % args.world == r] for r in range(args.world)]
    old_payloads = [pickle.dumps(([i for i, _ in s], to_coco_detections((o for _, o in s), (i for i, _ in s), mapping)))
                    for s in shards[1:]]
    new_rows = [detection_rows(s, torch.device("cpu")) for s in shards[1:]]
    gc.collect()
    gc.freeze()  # the parent's objects: out of the children's collections (and their copy-on-write)

    rows_a = {
        "old: all_gather_object, every rank": measure(lambda: old_rank(shards[0], old_payloads, mapping), repeats),
        "new: gather_rows, rank 0 (dst)": measure(lambda: new_rank(shards[0], new_rows, mapping), repeats),
        "new: gather_rows, other ranks": measure(lambda: new_rank(shards[1], None, mapping), repeats),
    }
    print("\n(a) gather + unpack, one rank's view (seconds, MiB)")
    print(f"{'path':36s}{'pack':>8s}{'receive':>9s}{'unpack':>9s}{'total':>9s}{'peak MiB':>10s}{'received MiB':>14s}"
          f"{'records':>11s}")
    for name, r in rows_a.items():
        r["total_s"] = r["pack_s"] + r["receive_s"] + r["unpack_s"]
        print(f"{name:36s}{r['pack_s']:>8.2f}{r['receive_s']:>9.2f}{r['unpack_s']:>9.2f}{r['total_s']:>9.2f}"
              f"{r['peak_mib']:>10.1f}{r['received_mib']:>14.1f}{r['records']:>11,d}")
    old, dst, other = rows_a.values()
    if old["records"] != dst["records"] or old["images"] != dst["images"]:
        raise SystemExit(f"bench_eval: the paths disagree: old {old['records']} records of {old['images']} images, "
                         f"new {dst['records']} of {dst['images']}")
    print(f"old / new, rank 0: time {old['total_s'] / dst['total_s']:.2f}x, peak memory "
          f"{old['peak_mib'] / max(dst['peak_mib'], 1e-9):.2f}x, "
          f"received {old['received_mib'] / dst['received_mib']:.2f}x")
    print(f"old / new, other ranks: time {old['total_s'] / other['total_s']:.2f}x, peak memory "
          f"{old['peak_mib'] / max(other['peak_mib'], 1e-9):.2f}x (they receive nothing but the counts)")

    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' "creating index..."
        gt.createIndex()
    records, _ = records_from_rows(torch.cat([detection_rows(s, torch.device("cpu")) for s in shards]), mapping)
    gc.collect()
    gc.freeze()
    rows_b = {name: measure(lambda name=name: eval_run(gt, records, name), repeats) for name in _evaluators()}
    print(f"\n(b) coco_stats over {args.images:,} images, {len(records):,} detections (seconds, MiB, AP in percent)")
    print(f"{'evaluator':20s}{'time':>8s}{'peak MiB':>10s}" + "".join(f"{n:>8s}" for n in STAT_NAMES))
    for name, r in rows_b.items():
        print(f"{name:20s}{r['eval_s']:>8.2f}{r['peak_mib']:>10.1f}" + "".join(f"{r[n]:>8.3f}" for n in STAT_NAMES))
    if len(rows_b) == 2:
        ref, fast = rows_b.values()
        diff = max(abs(ref[n] - fast[n]) for n in STAT_NAMES)
        print(f"pycocotools / faster-coco-eval: time {ref['eval_s'] / fast['eval_s']:.2f}x, peak memory "
              f"{ref['peak_mib'] / max(fast['peak_mib'], 1e-9):.2f}x; max |AP difference| over the six stats "
              f"{diff:.2e} (percent; the bound is 1e-3 AP = 0.1)")


if __name__ == "__main__":
    main()
