"""What the first machine with a GPU must confirm, in one command, in under 8 minutes.

It drives kdsweep's own engine (``train_one_epoch``, ``evaluate``, the Distiller, the registry
of KD terms, the collectives) without Ray or MLflow, so that it runs on a bare GPU machine with no
network: torch, torchvision, numpy and Pillow, plus two small wheels (pycocotools,
pytorch_msssim) that it installs from ``benchmarks/wheels/`` when they are missing (fetch them
once on a machine with network: ``python benchmarks/gpu_check.py --fetch-wheels``). Whatever it
cannot run is skipped with its reason; the summary says which sections ran.

Sections (``--only a,b``):

* ``amp``: a float16 autocast training step with a ``GradScaler`` through ``train_one_epoch``
  and the Distiller, for every key of the KD-term registry (each with the detector it needs);
  the losses must be finite and every KD term float32.
* ``ssim``: SSIM on the device against ``pytorch_msssim``: agreement (loss within 1e-4) and
  forward + backward time side by side, on RetinaNet's FPN maps at 800x1333 (256 channels).
* ``collectives``: the worker's collectives (finiteness flag, loss means, the detection
  gather, the node count) on two processes: NCCL when there are two GPUs, else gloo with CUDA
  tensors on one GPU (NCCL then stays unconfirmed, and the summary says so).
* ``paper_step``: the ``paper`` preset's step: RetinaNet R50 student, R101 teacher, SSIM on every
  FPN level with adapters, 800x1333, batch 2, AMP: ms per step, the share of it spent waiting
  for data (the trainer's loader, and one with 4 worker processes), peak GPU memory.
* ``evaluate``: ``evaluate`` over a few hundred synthetic images on the device, images/s.
* ``throughput``: the ablation table's params / img/s / speed-up columns as a GPU ablation
  measures them (``row_throughput(..., device="cuda")``, inside the Ray task that holds a GPU):
  the ``paper`` student and teacher, measured interleaved.

Usage::

    python benchmarks/gpu_check.py                  # on the GPU machine; figures in the summary
    python benchmarks/gpu_check.py --json out.json  # also as JSON ($OUT/gpu_check.json when $OUT is set)
    python benchmarks/gpu_check.py --device cpu --quick   # the CPU smoke version the tests run

Backbones start from random weights (no network to fetch ImageNet's): step times and memory do
not depend on the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "benchmarks" / "wheels"
sys.path.insert(0, str(ROOT))  # kdsweep from this checkout, installed or not

import torch  # noqa: E402

BUDGET_S = 450.0  # stop starting sections after this (the whole check must stay under 8 minutes)


class Skip(Exception):
    """A section that cannot run here; the message says why."""


# ---------------------------------------------------------------------------------- wheels
PACKAGES = {"pycocotools": "pycocotools", "pytorch_msssim": "pytorch-msssim", "faster_coco_eval": "faster-coco-eval"}
"""Module -> wheel name of what the GPU image lacks (kdsweep.train.evaluation imports both COCO evaluators)."""


def ensure_wheels() -> str:
    """Import the :data:`PACKAGES`, installing them from ``benchmarks/wheels/`` into a temporary
    folder on sys.path when missing (no network). Returns a note for the summary."""
    missing = []
    for name in PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if not missing:
        return f"{', '.join(PACKAGES)} importable"
    target = Path(tempfile.gettempdir()) / "kdsweep-gpu-check-wheels"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links", str(WHEELS),
           "--target", str(target), *(PACKAGES[m] for m in missing)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sys.path.insert(0, str(target))
    still = [m for m in missing if not _importable(m)]
    if still:
        return f"missing {', '.join(still)} (no wheel in {WHEELS}: {done.stderr.strip().splitlines()[-1:] or ''})"
    return f"installed {', '.join(missing)} from {WHEELS}"


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def fetch_wheels() -> int:
    """Download the wheels the GPU machine lacks (for its Python 3.12, manylinux x86_64)."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    for spec in PACKAGES.values():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "-d", str(WHEELS), spec]
        subprocess.run(cmd, check=True)
    print("\n".join(sorted(p.name for p in WHEELS.iterdir())))
    return 0


# --------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Milliseconds of ``fn()`` per call (after ``warmup`` calls), synchronised."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(1000 * (time.perf_counter() - start))
    return out


def model_cfg(arch: str, backbone: str, fpn: int, size: int, **options: Any):
    from kdsweep.config import ModelConfig

    extra = {"rpn_proposals": 300, "roi_samples": 128} if arch == "fasterrcnn" else {}
    max_size = size if size < 800 else 1333
    return ModelConfig(arch=arch, backbone=backbone, fpn_channels=fpn, min_size=size, max_size=max_size,
                       anchor_scale=2.0 if size < 800 else 4.0, options=options, **extra)


def synthetic_batch(n: int, height: int, width: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, height, width, generator=g))
        k = 4
        xy = torch.rand(k, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = 16 + torch.rand(k, 2, generator=g) * torch.tensor([width * 0.25, height * 0.25])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, classes + 1, (k,), generator=g)})
    return images, targets


def write_coco(folder: Path, n: int, height: int, width: int, classes: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` JPEG images of noise and a COCO file with four boxes each (COCO-like 640x480)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images_dir / f"{i:06d}.jpg", quality=90)
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "width": width, "height": height})
        for j in range(4):
            w, h = rng.uniform(16, width / 3), rng.uniform(16, height / 3)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            anns.append({"id": 4 * i + j, "image_id": i, "category_id": int(rng.integers(1, classes + 1)),
                         "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": w * h, "iscrowd": 0})
    ann = folder / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": c, "name": f"c{c}"} for c in range(1, classes + 1)]}))
    return ann, images_dir


# -------------------------------------------------------------------------------- sections
def section_amp(device: torch.device, quick: bool) -> dict[str, Any]:
    """A float16 + GradScaler step through train_one_epoch for every registry key."""
    from kdsweep.config import ExperimentConfig, KDTermConfig
    from kdsweep.train.distiller import build_distiller
    from kdsweep.train.engine import train_one_epoch
    from kdsweep.methods import TERMS
    from kdsweep.train.optim import Optimization
    from kdsweep.models.detectors import build_detector

    size, k = (96, 3) if quick else (320, 8)
    retina_s, retina_t = model_cfg("retinanet", "resnet18", 16 if quick else 64, size), model_cfg("retinanet", "resnet34", 32 if quick else 128, size)
    frcnn_s, frcnn_t = model_cfg("fasterrcnn", "resnet18", 16 if quick else 64, size), model_cfg("fasterrcnn", "resnet34", 32 if quick else 128, size)
    external = {"t_head": "external", "t_hidden": 1024, "t_samples": 32, "mimic_samples": 8}
    cases = {
        "l1": (retina_s, retina_t, KDTermConfig("l1", adapter=True)),
        "l2": (retina_s, retina_t, KDTermConfig("l2", adapter=True)),
        "ssim": (retina_s, retina_t, KDTermConfig("ssim", weight=3.0, adapter=True)),
        "sdf": (retina_s, retina_t, KDTermConfig("sdf", weight=0.01)),
        "csa": (retina_s, retina_t, KDTermConfig("csa", params={"start": 0.0})),
        "mimic": (frcnn_s, frcnn_t, KDTermConfig("mimic", adapter=True, params={"num_rois": 64})),
        "mimic_full": (frcnn_s, frcnn_t, KDTermConfig("mimic_full", adapter=True)),
        "mimic_logits": (retina_s, retina_t, KDTermConfig("mimic_logits")),
        "mimic_head": (frcnn_s, frcnn_t, KDTermConfig("mimic_head")),
        "mimicdet_teacher": (model_cfg("mimicdet", "resnet18", 16 if quick else 64, size, **external),
                             model_cfg("fasterrcnn", "resnet18", 16 if quick else 64, size), KDTermConfig("mimicdet_teacher")),
        "pkd": (retina_s, retina_t, KDTermConfig("pkd", weight=10.0, adapter=True)),
        "cwd": (retina_s, retina_t, KDTermConfig("cwd", weight=5.0, adapter=True)),
        "mgd": (retina_s, retina_t, KDTermConfig("mgd", weight=2e-5, adapter=True)),
        "fgd": (retina_s, retina_t, KDTermConfig("fgd", adapter=True)),
        "crosskd": (retina_s, retina_t, KDTermConfig("crosskd", adapter=True)),
    }
    missing = sorted(set(TERMS) - set(cases))
    # float16 with a GradScaler on CUDA, as the paper preset trains; the CPU smoke version uses
    # bfloat16 (CPU float16 convolutions are emulated and slow; tests/test_amp.py runs the CPU
    # GradScaler path)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    out: dict[str, Any] = {"dtype": str(dtype), "scaler": "GradScaler" if dtype is torch.float16 else None, "keys": {}}
    if missing:
        out["not covered"] = missing
    batch = synthetic_batch(2, size, size, k)
    for key, (student, teacher_cfg, term) in cases.items():
        torch.manual_seed(0)
        teacher = build_detector(teacher_cfg, k)
        distiller = build_distiller(ExperimentConfig(student=student, teacher=teacher_cfg, kd=(term,)), k, teacher).to(device)
        params = [p for p in distiller.trainable.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
        scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        dtypes: set[str] = set()
        hooks = [t.register_forward_hook(lambda m, i, o: dtypes.update(
            str(v.dtype) for v in (o.values() if isinstance(o, dict) else [o]))) for t in distiller.trainable.terms.values()]
        optimization = Optimization(optimizer, scheduler, params, grad_clip=10.0, scaler=scaler, amp_dtype=dtype)
        metrics = train_one_epoch(distiller, optimization, [batch] * (1 if quick else 3), device=device, epoch=1)
        for h in hooks:
            h.remove()
        finite = all(v == v and abs(v) != float("inf") for v in metrics.values())
        kd = {m: round(v, 4) for m, v in metrics.items() if m.startswith("loss/kd_")}
        out["keys"][key] = {"finite": finite, "kd_dtypes": sorted(dtypes), "kd": kd,
                            "scale": scaler.get_scale() if scaler is not None else None}
        if not finite or dtypes != {"torch.float32"}:
            out["ok"] = False
    out.setdefault("ok", True)
    return out


def section_ssim(device: torch.device, quick: bool) -> dict[str, Any]:
    """SSIM on the device vs pytorch_msssim on RetinaNet's FPN maps at 800x1333."""
    try:
        from pytorch_msssim import ssim as reference
    except ImportError as exc:
        raise Skip(f"pytorch_msssim missing ({exc}); put its wheel in benchmarks/wheels") from None
    from kdsweep.methods.ssim import ssim_feature_loss

    n, c = (2, 16) if quick else (2, 256)
    shapes = [(n, c, 100, 167), (n, c, 50, 84), (n, c, 25, 42), (n, c, 13, 21), (n, c, 7, 11)]
    if quick:
        shapes = [(n, c, 40, 48), (n, c, 20, 24), (n, c, 11, 12)]
    g = torch.Generator(device="cpu").manual_seed(0)
    rows, worst = [], 0.0
    for shape in shapes:
        x = torch.rand(*shape, generator=g).to(device).requires_grad_(True)
        y = (0.6 * x.detach() + 0.4 * torch.rand(*shape, generator=g).to(device)).clamp(0, 1)
        with torch.no_grad():
            ours = ssim_feature_loss(x, y, normalize=None)
            ref = 1 - reference(x, y, data_range=1, win_size=11, win_sigma=1.5) if min(shape[-2:]) >= 11 else None
        diff = abs(float(ours) - float(ref)) if ref is not None else None
        worst = max(worst, diff or 0.0)

        def step_ours():
            ssim_feature_loss(x, y, normalize=None).backward()

        def step_ref():
            (1 - reference(x, y, data_range=1, win_size=11, win_sigma=1.5)).backward()

        ms_ours = statistics.median(timed(step_ours, device, 5 if quick else 20))
        ms_ref = statistics.median(timed(step_ref, device, 5 if quick else 20)) if ref is not None else None
        rows.append({"shape": list(shape), "abs_diff": diff, "ms_ours": round(ms_ours, 3),
                     "ms_pytorch_msssim": round(ms_ref, 3) if ms_ref else None,
                     "ratio_ours_vs_ref": round(ms_ours / ms_ref, 2) if ms_ref else None})
    return {"levels": rows, "max_abs_diff": worst, "ok": worst < 1e-4}


def _collective_worker(rank: int, world: int, port: int, backend: str, queue: Any) -> None:
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist

    from kdsweep.train import collectives
    from kdsweep.train.engine import NonFiniteLossError, check_finite, train_one_epoch
    from kdsweep.train.optim import Optimization

    torch.cuda.set_device(rank if backend == "nccl" else 0)
    device = torch.device("cuda", torch.cuda.current_device())
    out: dict[str, Any] = {}
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        check_finite(torch.tensor(1.0, device=device), {}, epoch=1, step=0)
        bad = torch.tensor(float("nan") if rank == 1 else 1.0, device=device)
        try:
            check_finite(bad, {"x": bad}, epoch=1, step=0)
            out["nan_stops_every_rank"] = False
        except NonFiniteLossError:
            out["nan_stops_every_rank"] = True
        w = torch.nn.Parameter(torch.zeros((), device=device))

        class Toy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = w

            def forward(self, images, targets, progress=0.0):
                return {"mse": (self.w - float(rank + 2)) ** 2}

        toy = Toy()
        opt = torch.optim.SGD(toy.parameters(), lr=0.0)
        optimization = Optimization(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0), [w])
        metrics = train_one_epoch(toy, optimization, [([torch.zeros(3, 4, 4)], [{}])] * 2, device=device, epoch=1)
        out["loss_mean_ok"] = abs(metrics["loss/mse"] - (4.0 + 9.0) / 2) < 1e-5
        rows = torch.full((rank + 1, 7), float(rank), dtype=torch.float64, device=device)
        gathered = collectives.gather_rows(rows, dst=0)
        out["gather_ok"] = (gathered.shape[0] == 3) if rank == 0 else gathered is None
        out["nodes"] = collectives.count_distinct(socket.gethostname(), device)
    except Exception as exc:  # noqa: BLE001 - reported in the summary
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    queue.put((rank, out))


def section_collectives(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type != "cuda":
        raise Skip("needs CUDA (the CPU version is tests/test_collectives.py)")
    import torch.multiprocessing as mp

    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_collective_worker, args=(r, 2, port, backend, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    ok = all("error" not in r and r.get("nan_stops_every_rank") and r.get("loss_mean_ok") and r.get("gather_ok")
             for r in results.values())
    note = "NCCL, two GPUs" if backend == "nccl" else "gloo with CUDA tensors on one GPU: NCCL needs two GPUs, unconfirmed"
    return {"backend": backend, "note": note, "ranks": results, "ok": ok}


def section_paper_step(device: torch.device, quick: bool, workdir: Path) -> dict[str, Any]:
    """The paper preset's step: R50 student, R101 teacher, SSIM + adapters, 800x1333, AMP."""
    from kdsweep.config import ExperimentConfig, KDTermConfig, TrainConfig, teacher_experiment
    from kdsweep.data.loader import build_loaders
    from kdsweep.train.engine import train_one_epoch
    from kdsweep.train.model import build_model
    from kdsweep.train.optim import build_optimization

    size, height, width = (128, 96, 128) if quick else (800, 480, 640)
    classes, batch, steps = 80, 2, (3 if quick else 20)
    student = model_cfg("retinanet", "resnet18" if quick else "resnet50", 32 if quick else 256, size)
    teacher = model_cfg("retinanet", "resnet34" if quick else "resnet101", 32 if quick else 256, size)
    exp = ExperimentConfig(student=student, teacher=teacher, kd=(KDTermConfig("ssim", weight=3.0, adapter=True),))
    # the paper preset's optimisation (no clipping, as mmdetection's RetinaNet 1x) and data pipeline
    train_cfg = TrainConfig(batch_size=batch, lr=0.01, amp=True, warmup_iters=0, lr_schedule="constant", grad_clip=None,
                            hflip=0.5, aspect_grouping=3)
    torch.manual_seed(0)
    teacher_state = build_model(teacher_experiment(exp), classes).student.state_dict()
    distiller = build_model(exp, classes, teacher_state).to(device)
    optimization = build_optimization(distiller.trainable, distiller.student, train_cfg, device, steps_per_epoch=1000)
    ann, images = write_coco(workdir / "coco", batch * (steps + 4), height, width, classes)
    data = {"train_ann": str(ann), "val_ann": str(ann), "train_images": str(images), "val_images": str(images)}

    class Waiting:
        """The loader, timing how long each batch keeps the training loop waiting."""

        def __init__(self, loader: Any) -> None:
            self.loader, self.wait = loader, 0.0

        def __len__(self) -> int:
            return len(self.loader)

        def __iter__(self):
            it = iter(self.loader)
            while True:
                start = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                self.wait += time.perf_counter() - start
                yield item

    results: dict[str, Any] = {"resolution": f"{size}x{1333 if size >= 800 else size} (images {width}x{height})",
                               "batch": batch, "amp": str(optimization.amp_dtype), "steps": steps}
    # the training process decoding alone, then the paper's 3 loader processes per GPU (4 CPUs - 1)
    # with pinned memory, uint8 batches, flips and aspect-ratio groups (kdsweep.data.loader)
    for name, workers in (("trainer_loader", 0), ("paper_loader", 3)):
        loader = build_loaders(data, exp, dataclasses.replace(train_cfg, loader_workers=workers), 0, 1, device).train
        train_one_epoch(distiller, optimization, loader, device=device, epoch=1, max_iters=2)  # warm-up (cuDNN, allocator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        waiting = Waiting(loader)
        sync(device)
        start = time.perf_counter()
        train_one_epoch(distiller, optimization, waiting, device=device, epoch=1, max_iters=steps)
        sync(device)
        total = time.perf_counter() - start
        results[name] = {"ms_per_step": round(1000 * total / steps, 1), "data_wait_share": round(waiting.wait / total, 3),
                         "workers": workers, "images_per_s": round(batch * steps / total, 1)}
    if device.type == "cuda":
        results["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    results["ok"] = True
    return results


def section_evaluate(device: torch.device, quick: bool, workdir: Path) -> dict[str, Any]:
    try:
        import faster_coco_eval  # noqa: F401
        import pycocotools  # noqa: F401
    except ImportError as exc:
        raise Skip(f"{exc.name} missing; put its wheel in benchmarks/wheels (--fetch-wheels)") from None
    from torch.utils.data import DataLoader

    from kdsweep.data.dataset import CocoDetection, collate
    from kdsweep.train.engine import evaluate
    from kdsweep.models.detectors import build_detector

    n, size = (24, 128) if quick else (300, 800)
    height, width = (96, 128) if quick else (480, 640)
    ann, images = write_coco(workdir / "eval", n, height, width, 80, seed=1)
    dataset = CocoDetection(ann, images)
    torch.manual_seed(0)
    model = build_detector(model_cfg("retinanet", "resnet18" if quick else "resnet50", 32 if quick else 256, size), 80).to(device)
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate, num_workers=0 if quick else 4)
    sync(device)
    start = time.perf_counter()
    # prediction under autocast, as a paper run evaluates (float16 on CUDA, bfloat16 on the CPU)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    stats = evaluate(model, loader, device=device, coco_gt=dataset.coco_gt, label_to_cat_id=dataset.label_to_cat_id,
                     image_ids=dataset.image_ids, amp_dtype=amp_dtype)
    sync(device)
    seconds = time.perf_counter() - start
    # the paper preset's evaluator on the same predictions' numbers: faster-coco-eval against the reference
    fast = evaluate(model, loader, device=device, coco_gt=dataset.coco_gt, label_to_cat_id=dataset.label_to_cat_id,
                    image_ids=dataset.image_ids, amp_dtype=amp_dtype, evaluator="faster-coco-eval")
    gap = max(abs(stats[k] - fast[k]) for k in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"))
    return {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1), "amp": str(amp_dtype),
            "eval_images": stats["eval_images"], "AP": stats["AP"], "faster_coco_eval_max_gap": gap,
            "ok": stats["eval_images"] == n and gap <= 0.1}


def section_throughput(device: torch.device, quick: bool) -> dict[str, Any]:
    from kdsweep.config import ExperimentConfig, from_dict, merge
    from kdsweep.presets import PRESETS
    from kdsweep.report.throughput import row_throughput

    experiment = PRESETS["paper"].experiment
    if quick:  # the same code path at a size the CPU smoke version can afford
        small = {"backbone": "resnet18", "fpn_channels": 32, "min_size": 128, "max_size": 128, "weights": None}
        experiment = merge(experiment, {"student": small, "teacher": dict(small, backbone="resnet34", fpn_channels=64)})
    # a distilling row, as the table's rows are: its teacher is the one measured
    rows = {"student": from_dict(ExperimentConfig, merge(experiment, {"kd": [{"loss": "ssim", "adapter": True}]}))}
    columns = row_throughput(rows, 80, with_teacher=True, quick=quick, device=device.type)
    student, teacher = columns["student"], columns["teacher"]
    return {"student_img_s": round(student["infer_img_s"], 1), "teacher_img_s": round(teacher["infer_img_s"], 1),
            "speedup": round(student["infer_speedup"], 2), "student_params_M": round(student["params_M"], 2),
            "ok": student["infer_img_s"] > 0 and teacher["infer_img_s"] > 0}


# ---------------------------------------------------------------------------------- runner
SECTIONS = ("amp", "ssim", "collectives", "paper_step", "evaluate", "throughput")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke version)")
    parser.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--json", help="also write the summary here ($OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--fetch-wheels", action="store_true", help="download the wheels a bare GPU machine lacks, then exit")
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    start = time.time()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__, "python": platform.python_version(), "wheels": ensure_wheels(), "sections": {},
    }
    if device.type != "cuda":
        summary["note"] = "no CUDA device: the CPU smoke version; nothing here confirms GPU figures"
    wanted = args.only.split(",") if args.only else list(SECTIONS)
    workdir = Path(tempfile.mkdtemp(prefix="kdsweep-gpu-check-"))
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "amp": lambda: section_amp(device, args.quick),
        "ssim": lambda: section_ssim(device, args.quick),
        "collectives": lambda: section_collectives(device, args.quick),
        "paper_step": lambda: section_paper_step(device, args.quick, workdir),
        "evaluate": lambda: section_evaluate(device, args.quick, workdir),
        "throughput": lambda: section_throughput(device, args.quick),
    }
    for name in wanted:
        if name not in runners:
            print(f"gpu_check: unknown section '{name}'; use {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
        if time.time() - start > BUDGET_S:
            summary["sections"][name] = {"skipped": f"time budget of {BUDGET_S:.0f} s used up"}
            continue
        began = time.time()
        try:
            result = runners[name]()
        except Skip as exc:
            result = {"skipped": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one failing section must not hide the others
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.time() - began, 1)
        summary["sections"][name] = result
        print(f"[{name}] {json.dumps({k: v for k, v in result.items() if k != 'trace'})}", flush=True)
    summary["seconds"] = round(time.time() - start, 1)
    failed = [n for n, r in summary["sections"].items() if r.get("ok") is False]
    summary["failed"] = failed
    text = json.dumps(summary, indent=1)
    for path in filter(None, (args.json, os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)):
        Path(path).write_text(text)
    print(f"gpu_check: {len(summary['sections'])} section(s) in {summary['seconds']} s on {summary['device']}; "
          f"failed: {', '.join(failed) or 'none'}; skipped: "
          f"{', '.join(n for n, r in summary['sections'].items() if 'skipped' in r) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
