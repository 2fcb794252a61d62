"""What the first machine with a GPU must confirm, in one command, in under 8 minutes.

It drives kdsweep's own engine (``train_one_epoch``, ``evaluate``, the Distiller, the registry
of KD terms, the collectives, DDP, checkpoints) without Ray or MLflow, so that it runs on a bare
GPU machine with no network and any Python from 3.10 to 3.13: torch, torchvision, numpy and
Pillow, plus three small wheels (pycocotools, faster-coco-eval, pytorch_msssim) that it installs
from ``benchmarks/wheels/`` when they are missing. Fetch those once on a machine with network
(``python benchmarks/gpu_check.py --fetch-wheels``: cp310-cp313, manylinux2014 and
manylinux_2_28, about 25 MB). The folder is ignored by git: the device call must carry it
(``carry: ["benchmarks/wheels"]``). A section whose wheel is missing is skipped with its reason,
never failed; training sections need none of them. The summary says what ran.

Sections (``--only a,b``), in the order they run (the most important first, as the time budget
stops starting sections after 450 s):

* ``amp``: a float16 autocast step with a ``GradScaler`` through ``train_one_epoch`` and the
  Distiller, for every key of the KD-term registry; losses finite, every KD term float32.
* ``nccl``: a world-size-1 NCCL process group and kdsweep's collectives on the exact tensors a
  worker passes (``is_distributed()`` forced true, so the raw ``dist`` calls run): the
  finiteness MIN all-reduce, the loss-mean SUM, the detection gather (``dist.gather`` under NCCL),
  the metrics broadcast, the node count. The CPU smoke version runs them under gloo.
* ``ddp_amp``: DDP (world size 1) around the trainable part with ``build_optimization``, for an
  SSIM row and a CSA row (CSA's own Adam under the GradScaler), with the backbone frozen for
  the first half: the freeze's re-wrap of DDP, the thaw, the assistant's optimizer.
* ``paper_step``: the ``paper`` preset's step as the preset builds it (R50 student, R101 teacher,
  FrozenBatchNorm with ``trainable_backbone_layers=3``; the ImageNet weights loader patched to
  random weights, nothing downloaded), SSIM on every FPN level with adapters, 800x1333, batch 2,
  AMP: ms per step, the share spent waiting for data (the trainer's loader, and 3 loader
  processes), peak GPU memory.
* ``largest``: peak memory and ms per step of the likeliest out-of-memory trial of all the
  ablations: ScaleKD's ``sdf shared + csa`` row with its 2x teacher (1600x2666 inputs).
* ``checkpoint``: save and restore on the device (model, main optimizer, CSA's Adam, the
  GradScaler), then the restored run's next step equals the original's.
* ``evaluate``: ``evaluate`` over a few hundred synthetic images of a RetinaNet that detects
  (classification bias 0): float32 against AMP, and faster-coco-eval against pycocotools.
* ``speedups``: ms per step with and without each GPU speed-up, measured interleaved in this
  call: TF32 (``train.tf32``), channels-last backbones (``train.channels_last``), the frozen
  backbone computing no gradients (against computing and dropping them), SSIM's cached window
  (against building it each call), CSA's attention through ``scaled_dot_product_attention``'s
  fused kernels (against its math kernel, which builds the attention matrix).
* ``collectives``: the worker's collectives on two processes: NCCL when there are two GPUs, else
  gloo with CUDA tensors on one GPU.
* ``ssim``: SSIM on the device against ``pytorch_msssim`` on RetinaNet's FPN maps at 800x1333.
* ``throughput``: the ablation table's params / img/s / speed-up columns as a GPU ablation
  measures them, for the ``paper`` student and teacher.

Usage::

    python benchmarks/gpu_check.py                  # on the GPU machine; figures in the summary
    python benchmarks/gpu_check.py --json out.json  # also as JSON ($OUT/gpu_check.json when $OUT is set)
    python benchmarks/gpu_check.py --device cpu --quick   # the CPU smoke version the tests run
    python benchmarks/cost_model.py --gpu-check gpu_check.json   # GPU-hours from the measured step

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
import queue as queue_module
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
PACKAGES = {"pycocotools": "pycocotools>=2.0.7", "faster_coco_eval": "faster-coco-eval>=1.8",
            "pytorch_msssim": "pytorch-msssim>=1.0"}
"""Module -> requirement of what a bare GPU image lacks (the versions of pyproject.toml): the two
COCO evaluators (section ``evaluate``) and the SSIM reference (section ``ssim``)."""
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
"""faster-coco-eval >= 1.8 ships manylinux_2_28 wheels only; asking for manylinux2014 alone gets 1.7.2."""


def ensure_wheels(wheels: Path) -> dict[str, str]:
    """Import each of :data:`PACKAGES`, installing the missing ones from ``wheels`` into a
    temporary folder on sys.path (``pip --no-index``: no network). Returns module -> what
    happened (``importable``, ``installed``, or why not), for the summary and the sections."""
    status: dict[str, str] = {}
    missing = [m for m in PACKAGES if not _importable(m)]
    for m in PACKAGES:
        status[m] = "importable" if m not in missing else "missing"
    if not missing:
        return status
    target = Path(tempfile.gettempdir()) / f"kdsweep-gpu-check-wheels-py{sys.version_info[0]}{sys.version_info[1]}"
    sys.path.insert(0, str(target))
    for m in missing:  # one at a time: a package without a wheel for this Python does not stop the others
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links", str(wheels),
               "--target", str(target), PACKAGES[m]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if _importable(m):
            status[m] = f"installed from {wheels}"
        else:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            status[m] = (f"missing: no wheel for Python {platform.python_version()} in {wheels} ({last[:160]}); "
                         "fetch them with --fetch-wheels and carry benchmarks/wheels")
    return status


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def fetch_wheels(wheels: Path) -> int:
    """Download the wheels a bare GPU machine lacks, for every Python of :data:`PYTHONS` and the
    manylinux tags of :data:`PLATFORMS` (x86_64)."""
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    for python in PYTHONS:
        for spec in PACKAGES.values():
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", python, *platforms, "-d", str(wheels), spec]
            subprocess.run(cmd, check=True)
    files = sorted(wheels.iterdir())
    print("\n".join(p.name for p in files))
    print(f"{len(files)} wheels, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB in {wheels}")
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


def side_by_side(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds per call of each of ``fns``, measured interleaved (a, b, a, b, ...)
    after ``warmup`` calls of each, so that clocks and other load drift alike for all."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def no_downloads():
    """torchvision's ImageNet weights load as the architecture's random initialisation: the
    ``paper`` preset's models build exactly as in a run (FrozenBatchNorm2d, torchvision's frozen
    early stages), with nothing downloaded."""
    import torchvision
    from torchvision.models._api import WeightsEnum

    def random_state(self: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        name = type(self).__name__.removesuffix("_Weights").lower()  # ResNet50_Weights -> resnet50
        return torchvision.models.get_model(name, weights=None).state_dict()

    real = WeightsEnum.get_state_dict
    WeightsEnum.get_state_dict = random_state  # type: ignore[method-assign]
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = real  # type: ignore[method-assign]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process_group(device: torch.device):
    """A world-size-1 process group of this process: NCCL on CUDA, gloo on the CPU. Yields the
    backend's name."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def paper_models(quick: bool) -> tuple[Any, Any]:
    """The ``paper`` preset's student and teacher configs as the preset builds them (ImageNet
    weights, so FrozenBatchNorm2d and ``trainable_backbone_layers=3``); ``quick``: ResNet-18/34
    at 128 pixels, the same code path."""
    from kdsweep.config import ModelConfig, from_dict, merge
    from kdsweep.presets import PRESETS

    experiment = PRESETS["paper"].experiment
    student, teacher = dict(experiment["student"]), dict(experiment["teacher"])
    if quick:
        small = {"min_size": 128, "max_size": 128, "fpn_channels": 32, "anchor_scale": 2.0}
        student = merge(student, {**small, "backbone": "resnet18", "weights": "torchvision:ResNet18_Weights.IMAGENET1K_V1"})
        teacher = merge(teacher, {**small, "backbone": "resnet34", "weights": "torchvision:ResNet34_Weights.IMAGENET1K_V1"})
    return from_dict(ModelConfig, student, "paper.student"), from_dict(ModelConfig, teacher, "paper.teacher")


def distiller_for(exp: Any, classes: int, device: torch.device) -> Any:
    """The Distiller of ``exp`` on ``device`` with a teacher trained elsewhere (its weights random
    here), built as a worker builds it."""
    from kdsweep.config import teacher_experiment
    from kdsweep.train.model import build_model

    with no_downloads():
        teacher_state = build_model(teacher_experiment(exp), classes).student.state_dict()
        return build_model(exp, classes, teacher_state).to(device)


def on_device(batch: tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]], device: torch.device):
    images, targets = batch
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


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
        raise Skip(f"pytorch_msssim missing ({exc}); put its wheel in benchmarks/wheels (--fetch-wheels) and carry that folder") from None
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
    out: dict[str, Any] = {}
    try:  # an import error too goes to the parent at once, not after its queue timeout
        sys.path.insert(0, str(ROOT))
        import torch.distributed as dist

        from kdsweep.train import collectives
        from kdsweep.train.engine import NonFiniteLossError, check_finite, train_one_epoch
        from kdsweep.train.optim import Optimization
    except BaseException as exc:  # noqa: BLE001 - reported in the summary
        queue.put((rank, {"error": f"{type(exc).__name__}: {exc}"}))
        return
    try:
        torch.cuda.set_device(rank if backend == "nccl" else 0)
        device = torch.device("cuda", torch.cuda.current_device())
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


def gather_children(procs: list[Any], queue: Any, timeout: float) -> dict[int, dict[str, Any]]:
    """Each child's ``(rank, dict)`` from ``queue``; a child that exits without reporting (killed,
    or it could not even start) counts as failed at once, with its exit code, instead of leaving
    the parent waiting for the whole ``timeout``."""
    results: dict[int, dict[str, Any]] = {}
    deadline = time.time() + timeout
    while len(results) < len(procs) and time.time() < deadline:
        try:
            rank, out = queue.get(timeout=1.0)
            results[rank] = out
            continue
        except queue_module.Empty:
            pass
        for rank, p in enumerate(procs):
            if rank not in results and p.exitcode is not None:
                with contextlib.suppress(queue_module.Empty):  # it may have reported just before exiting
                    while True:
                        r, out = queue.get(timeout=0.5)
                        results[r] = out
                if rank not in results:
                    results[rank] = {"error": f"rank {rank} exited with code {p.exitcode} before reporting"}
    for rank, p in enumerate(procs):
        results.setdefault(rank, {"error": f"rank {rank} reported nothing in {timeout:.0f} s"})
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    return results


def section_collectives(device: torch.device, quick: bool, worker: Callable[..., None] = _collective_worker) -> dict[str, Any]:
    if device.type != "cuda":
        raise Skip("needs CUDA (the CPU version is tests/test_collectives.py)")
    import torch.multiprocessing as mp

    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, backend, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = gather_children(procs, queue, timeout=180)
    ok = all("error" not in r and r.get("nan_stops_every_rank") and r.get("loss_mean_ok") and r.get("gather_ok")
             for r in results.values())
    note = "NCCL, two GPUs" if backend == "nccl" else "gloo with CUDA tensors on one GPU: NCCL needs two GPUs (see nccl)"
    return {"backend": backend, "note": note, "ranks": results, "ok": ok}


def section_nccl(device: torch.device, quick: bool) -> dict[str, Any]:
    """kdsweep's collectives, forced to run their ``dist`` calls in a world-size-1 group, on the
    tensors a worker passes them (dtypes and shapes of engine.py)."""
    import torch.distributed as dist

    from kdsweep.train import collectives

    out: dict[str, Any] = {}
    real = collectives.is_distributed
    with process_group(device) as backend:
        collectives.is_distributed = lambda: True  # type: ignore[assignment]
        try:
            out["backend"] = backend
            out["backend_config"] = dist.get_backend_config()
            out["gathers_on_device"] = collectives.gathers_on(device)
            # the finiteness flag: an int32 MIN all-reduce of isfinite(total) (engine.check_finite)
            out["all_true"] = collectives.all_true(torch.isfinite(torch.tensor(3.0, device=device))) is True
            out["all_false"] = collectives.all_true(torch.isfinite(torch.tensor(float("inf"), device=device))) is False
            # the epoch's loss means: a float32 vector, SUM then divide (engine.train_one_epoch)
            local = torch.tensor([1.5, 2.5, 30.0], device=device)
            out["mean"] = torch.equal(collectives.mean_over_workers(local), local)
            # the detections: (n, 7) float64 rows, counts all-gathered, rows gathered to rank 0 (engine.evaluate)
            rows = torch.arange(35, dtype=torch.float64, device=device).reshape(5, 7)
            gathered = collectives.gather_rows(rows, dst=0)
            out["gather"] = gathered is not None and torch.equal(gathered, rows)
            empty = collectives.gather_rows(rows[:0], dst=0)
            out["gather_empty"] = empty is not None and empty.shape == (0, 7)
            # the metrics: a float64 vector broadcast from rank 0
            values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0], dtype=torch.float64, device=device)
            out["broadcast"] = torch.equal(collectives.broadcast_values(values.clone(), src=0), values)
            out["nodes"] = collectives.count_distinct(socket.gethostname(), device)
            sync(device)
        finally:
            collectives.is_distributed = real  # type: ignore[assignment]
    checks = ("all_true", "all_false", "mean", "gather", "gather_empty", "broadcast")
    out["ok"] = all(out[c] for c in checks) and out["nodes"] == 1 and out["gathers_on_device"]  # NCCL's gather, not the all-gather fallback
    if device.type != "cuda":
        out["note"] = "gloo on the CPU: the smoke version; NCCL unconfirmed"
    return out


def _row(kd: str, quick: bool, **train: Any) -> tuple[Any, Any]:
    """``(ExperimentConfig, TrainConfig)`` of a small distilling row for the DDP, checkpoint and
    speed-up sections: ``kd`` ssim (SSIM with adapters on every level), csa (ScaleKD's assistant
    from step 0, its own Adam) or sdf+csa; R18 <- R34 at 96 px (quick), else R50 <- R101 at 512 px
    (the preset's models at a size that leaves time for the rest)."""
    from kdsweep.config import ExperimentConfig, KDTermConfig, TrainConfig

    terms = {"ssim": (KDTermConfig("ssim", weight=3.0, adapter=True),),
             "csa": (KDTermConfig("csa", params={"start": 0.0}),),
             "sdf+csa": (KDTermConfig("sdf", weight=0.01, params={"shared": True, "dilations": [1, 2, 3]}),
                         KDTermConfig("csa", params={"start": 0.0}))}[kd]
    size = 96 if quick else 512
    student = model_cfg("retinanet", "resnet18" if quick else "resnet50", 16 if quick else 256, size)
    teacher = model_cfg("retinanet", "resnet34" if quick else "resnet101", 32 if quick else 256, size)
    exp = ExperimentConfig(student=student, teacher=teacher, kd=terms)
    cfg = TrainConfig(batch_size=2, lr=0.01, amp=True, warmup_iters=0, lr_schedule="constant", grad_clip=None, **train)
    return dataclasses.replace(exp, train=cfg), cfg


def section_ddp_amp(device: torch.device, quick: bool) -> dict[str, Any]:
    """DDP (world size 1) around the trainable part, AMP, the frozen backbone's re-wrap and thaw."""
    from torch.nn.parallel import DistributedDataParallel

    from kdsweep.train.engine import train_one_epoch
    from kdsweep.train.optim import build_optimization

    classes, steps = 8, 4
    out: dict[str, Any] = {}
    with process_group(device) as backend:
        out["backend"] = backend
        for kd in ("ssim", "csa"):
            exp, cfg = _row(kd, quick, freeze_backbone=0.5)
            torch.manual_seed(0)
            distiller = distiller_for(exp, classes, device)
            ddp = (lambda m: DistributedDataParallel(m, device_ids=[device.index or 0])) if device.type == "cuda" \
                else DistributedDataParallel
            distiller.wrap(ddp)
            optimization = build_optimization(distiller.trainable, distiller.student, cfg, device, steps_per_epoch=steps)
            wraps: list[int] = []

            def rewrap() -> None:
                wraps.append(1)
                distiller.rewrap(ddp)

            optimization.rewrap = rewrap
            body = [p for p in distiller.student.backbone.body.parameters() if p.requires_grad]
            own = [p for opt, _ in optimization.term_optimizers for g in opt.param_groups for p in g["params"]]
            start_body, start_own = [p.detach().clone() for p in body], [p.detach().clone() for p in own]
            size = 96 if quick else 512
            loader = [on_device(synthetic_batch(2, size, size, classes, seed=i), device) for i in range(steps)]
            frozen = train_one_epoch(distiller, optimization, loader[:2], device=device, epoch=1, total_steps=steps)
            still = all(torch.equal(a, b) for a, b in zip(start_body, body))
            thawed = train_one_epoch(distiller, optimization, loader[2:], device=device, epoch=1, step_offset=2,
                                     total_steps=steps)
            moved = any(not torch.equal(a, b) for a, b in zip(start_body, body))
            finite = all(v == v and abs(v) != float("inf") for m in (frozen, thawed) for v in m.values())
            row = {"loss": round(thawed["loss"], 4), "finite": finite, "ddp_wraps_after_build": len(wraps),
                   "body_still_while_frozen": still, "body_trains_after": moved,
                   "scale": optimization.scaler.get_scale() if optimization.scaler is not None else None,
                   "amp": str(optimization.amp_dtype)}
            if kd == "csa":
                row["own_adam_stepped"] = bool(own) and any(not torch.equal(a, b) for a, b in zip(start_own, own))
            row["ok"] = finite and still and moved and len(wraps) == 2 and row.get("own_adam_stepped", True)
            out[kd] = row
            del distiller, optimization, loader
    out["ok"] = all(out[k]["ok"] for k in ("ssim", "csa"))
    return out


def section_paper_step(device: torch.device, quick: bool, workdir: Path) -> dict[str, Any]:
    """The paper preset's step as the preset builds it: R50 student, R101 teacher (FrozenBatchNorm,
    ``trainable_backbone_layers=3``), SSIM + adapters, 800x1333, AMP."""
    from kdsweep.config import ExperimentConfig, KDTermConfig, TrainConfig
    from kdsweep.data.loader import build_loaders
    from kdsweep.train.engine import train_one_epoch
    from kdsweep.train.optim import build_optimization
    from torchvision.ops.misc import FrozenBatchNorm2d

    height, width = (96, 128) if quick else (480, 640)
    classes, batch, steps = 80, 2, (3 if quick else 20)
    student, teacher = paper_models(quick)
    exp = ExperimentConfig(student=student, teacher=teacher, kd=(KDTermConfig("ssim", weight=3.0, adapter=True),))
    # the paper preset's optimisation (no clipping, as mmdetection's RetinaNet 1x) and data pipeline
    train_cfg = TrainConfig(batch_size=batch, lr=0.01, amp=True, warmup_iters=0, lr_schedule="constant", grad_clip=None,
                            hflip=0.5, aspect_grouping=3)
    torch.manual_seed(0)
    distiller = distiller_for(exp, classes, device)
    optimization = build_optimization(distiller.trainable, distiller.student, train_cfg, device, steps_per_epoch=1000)
    body = distiller.student.backbone.body
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

    results: dict[str, Any] = {
        "student": f"{student.backbone} ({sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules())} FrozenBatchNorm2d, "
                   f"{sum(p.numel() for p in body.parameters() if not p.requires_grad) / 1e6:.2f} M body parameters frozen "
                   f"by trainable_backbone_layers={student.trainable_backbone_layers})",
        "teacher": teacher.backbone,
        "resolution": f"{student.min_size}x{student.max_size} (images {width}x{height})",
        "batch": batch, "amp": str(optimization.amp_dtype), "steps": steps,
    }
    # the training process decoding alone, then the paper's 3 loader processes per GPU (4 CPUs - 1)
    # with pinned memory, uint8 batches, flips and aspect-ratio groups (kdsweep.data.loader)
    for name, workers in (("trainer_loader", 0), ("paper_loader", 3)):
        loader = build_loaders(data, exp, dataclasses.replace(train_cfg, loader_workers=workers), 0, 1, device).train
        train_one_epoch(distiller, optimization, loader, device=device, epoch=1, max_iters=2)  # warm-up (cuDNN, allocator)
        reset_peak(device)
        waiting = Waiting(loader)
        sync(device)
        start = time.perf_counter()
        train_one_epoch(distiller, optimization, waiting, device=device, epoch=1, max_iters=steps)
        sync(device)
        total = time.perf_counter() - start
        results[name] = {"ms_per_step": round(1000 * total / steps, 1), "data_wait_share": round(waiting.wait / total, 3),
                         "workers": workers, "images_per_s": round(batch * steps / total, 1)}
    results["peak_memory_GiB"] = peak_gib(device)
    results["ok"] = all(results[n]["ms_per_step"] > 0 for n in ("trainer_loader", "paper_loader")) and \
        any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    return results


def section_largest(device: torch.device, quick: bool) -> dict[str, Any]:
    """ScaleKD's ``sdf shared + csa`` row with the 2x teacher (student 800x1333, teacher
    1600x2666), the paper's models, batch 2, AMP: the likeliest out-of-memory trial."""
    from kdsweep.config import ExperimentConfig, KDTermConfig, TrainConfig
    from kdsweep.train.engine import train_one_epoch
    from kdsweep.train.optim import build_optimization

    student, teacher = paper_models(quick)
    kd = (KDTermConfig("sdf", weight=0.01, params={"shared": True, "dilations": [1, 2, 3]}),
          KDTermConfig("csa", params={"ratios": [1, 2, 4, 8], "start": 0.0}))
    exp = ExperimentConfig(student=student, teacher=teacher, kd=kd, teacher_scale=2.0)
    cfg = TrainConfig(batch_size=2, lr=0.01, amp=True, warmup_iters=0, lr_schedule="constant", grad_clip=None)
    classes, steps = 80, (2 if quick else 4)
    reset_peak(device)
    torch.manual_seed(0)
    distiller = distiller_for(exp, classes, device)
    optimization = build_optimization(distiller.trainable, distiller.student, cfg, device, steps_per_epoch=100)
    h, w = (student.min_size, student.max_size) if not quick else (96, 128)
    batch = on_device(synthetic_batch(2, h, w, classes), device)  # the widest COCO aspect: 800x1333 after resizing
    train_one_epoch(distiller, optimization, [batch], device=device, epoch=1)  # warm-up
    sync(device)
    start = time.perf_counter()
    metrics = train_one_epoch(distiller, optimization, [batch] * steps, device=device, epoch=1)
    sync(device)
    out = {"student_input": f"{h}x{w}", "teacher_input": f"{round(h * 2)}x{round(w * 2)}",
           "ms_per_step": round(1000 * (time.perf_counter() - start) / steps, 1), "peak_memory_GiB": peak_gib(device),
           "loss": round(metrics["loss"], 4)}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        out["device_memory_GiB"] = round(total, 1)
        out["headroom_GiB"] = round(total - out["peak_memory_GiB"], 1)
    out["ok"] = metrics["loss"] == metrics["loss"]
    return out


def section_checkpoint(device: torch.device, quick: bool, workdir: Path) -> dict[str, Any]:
    """save_checkpoint / load_checkpoint on the device: the trainable part, the main optimizer,
    CSA's Adam and the GradScaler come back equal, and the restored run's next step is the same."""
    from kdsweep.train.checkpoint import load_checkpoint, save_checkpoint
    from kdsweep.train.engine import train_one_epoch
    from kdsweep.train.optim import build_optimization

    exp, cfg = _row("sdf+csa", quick)
    classes, folder = 8, workdir / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    size = 96 if quick else 512
    batches = [on_device(synthetic_batch(2, size, size, classes, seed=i), device) for i in range(3)]

    def build() -> tuple[Any, Any]:
        torch.manual_seed(0)
        d = distiller_for(exp, classes, device)
        return d, build_optimization(d.trainable, d.student, cfg, device, steps_per_epoch=10)

    first, opt_first = build()
    train_one_epoch(first, opt_first, batches[:2], device=device, epoch=1, total_steps=10)
    save_checkpoint(str(folder), first, opt_first, epoch=1)
    second, opt_second = build()
    next_epoch = load_checkpoint(str(folder), second, opt_second)
    same_weights = all(torch.equal(a, b) for a, b in zip(first.trainable.state_dict().values(),
                                                         second.trainable.state_dict().values()))
    on_dev = all(p.device.type == device.type for p in second.trainable.parameters())

    def flat_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [v for st in opt.state_dict()["state"].values() for v in st.values() if isinstance(v, torch.Tensor)]

    same_optimizers = all(
        len(flat_state(a)) == len(flat_state(b)) > 0 and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(flat_state(a), flat_state(b)))
        for a, b in zip(opt_first.optimizers, opt_second.optimizers))
    scale = (opt_first.scaler.get_scale(), opt_second.scaler.get_scale()) if opt_first.scaler is not None else None
    state_on_dev = all(v.device.type == device.type for opt in opt_second.optimizers for st in opt.state.values()
                       for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step")
    torch.manual_seed(1)
    a = train_one_epoch(first, opt_first, batches[2:], device=device, epoch=2, step_offset=2, total_steps=10)["loss"]
    torch.manual_seed(1)
    b = train_one_epoch(second, opt_second, batches[2:], device=device, epoch=2, step_offset=2, total_steps=10)["loss"]
    size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    out = {"next_epoch": next_epoch, "same_weights": same_weights, "same_optimizers": same_optimizers,
           "optimizers": len(opt_first.optimizers), "scale": scale, "on_device": on_dev and state_on_dev,
           "next_loss": [round(a, 5), round(b, 5)], "checkpoint_MiB": round(size_mb, 1)}
    out["ok"] = (next_epoch == 2 and same_weights and same_optimizers and on_dev and state_on_dev
                 and len(opt_first.optimizers) == 2 and (scale is None or scale[0] == scale[1])
                 and abs(a - b) <= 1e-3 * max(1.0, abs(a)))
    return out


def section_evaluate(device: torch.device, quick: bool, workdir: Path) -> dict[str, Any]:
    """``evaluate`` of a RetinaNet that detects (classification bias 0, so every anchor scores
    0.5 before training): float32 against AMP, and faster-coco-eval against pycocotools on the
    same predictions."""
    for module in ("pycocotools", "faster_coco_eval"):
        if not _importable(module):
            raise Skip(f"{module} missing; put its wheel in benchmarks/wheels (--fetch-wheels) and carry that folder")
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
    bias = model.head.classification_head.cls_logits.bias  # (anchors x classes), class-major per anchor
    with torch.no_grad():  # every anchor scores 0.5 for every real class: detections everywhere, not none
        bias.zero_()
        bias[0::model.head.classification_head.num_classes] = -20.0  # label 0 is no category (torchvision's background)
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate, num_workers=0 if quick else 4)
    common = {"device": device, "coco_gt": dataset.coco_gt, "label_to_cat_id": dataset.label_to_cat_id,
              "image_ids": dataset.image_ids}
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16  # a paper run evaluates under autocast
    sync(device)
    start = time.perf_counter()
    amp = evaluate(model, loader, amp_dtype=amp_dtype, **common)
    sync(device)
    seconds = time.perf_counter() - start
    full = evaluate(model, loader, amp_dtype=None, **common)
    fast = evaluate(model, loader, amp_dtype=amp_dtype, evaluator="faster-coco-eval", **common)
    names = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
    finite = [k for k in names if amp[k] == amp[k] and full[k] == full[k]]
    amp_gap = max(abs(amp[k] - full[k]) for k in finite)
    fast_gap = max(abs(amp[k] - fast[k]) for k in finite)
    with torch.no_grad():
        model.eval()
        detections = sum(len(o["boxes"]) for o in model([dataset[i][0].to(device).float() / 255 for i in range(2)])) / 2
    return {"images": n, "seconds_amp": round(seconds, 2), "images_per_s": round(n / seconds, 1), "amp": str(amp_dtype),
            "detections_per_image": detections, "eval_images": amp["eval_images"],
            "AP_float32": round(full["AP"], 3), "AP_amp": round(amp["AP"], 3), "AP50_amp": round(amp["AP50"], 3),
            "amp_vs_float32_max_gap": round(amp_gap, 3), "faster_coco_eval_max_gap": round(fast_gap, 4),
            "ok": amp["eval_images"] == n and detections > 0 and amp["AP50"] > 0 and fast_gap <= 0.1 and amp_gap <= 0.5}


def section_speedups(device: torch.device, quick: bool) -> dict[str, Any]:
    """Each GPU speed-up on and off, ms per step (or per call) measured interleaved."""
    from kdsweep.methods import ssim as ssim_module
    from kdsweep.methods.ssim import _check, _device_ssim_mean
    from kdsweep.methods.ssim._common import effective_window, gaussian_window
    from kdsweep.train.engine import train_one_epoch
    from kdsweep.train.optim import build_optimization, float32_settings

    classes, repeats = 8, (2 if quick else 6)
    size = 96 if quick else 512
    batch = on_device(synthetic_batch(2, size, size, classes), device)
    out: dict[str, Any] = {"note": "ms per step of R50 <- R101 at 512 px, batch 2, AMP" if not quick else "CPU smoke: tiny"}

    def stepper(kd: str, **train: Any) -> Callable[[], Any]:
        exp, cfg = _row(kd, quick, **train)
        torch.manual_seed(0)
        distiller = distiller_for(exp, classes, device)
        if cfg.channels_last:
            distiller.channels_last()
        optimization = build_optimization(distiller.trainable, distiller.student, cfg, device, steps_per_epoch=100)
        return lambda: train_one_epoch(distiller, optimization, [batch], device=device, epoch=1, total_steps=100)

    # TF32: global flags, so each call sets its own before its step
    plain, tf32 = stepper("ssim"), stepper("ssim", tf32=True)
    from kdsweep.config import TrainConfig

    ms = side_by_side({"float32": lambda: (float32_settings(TrainConfig()), plain()),
                       "tf32": lambda: (float32_settings(TrainConfig(tf32=True)), tf32())}, device, repeats)
    float32_settings(TrainConfig())
    out["tf32"] = {**ms, "ratio": round(ms["tf32"] / ms["float32"], 3)}
    del plain, tf32
    # channels-last backbones
    plain, cl = stepper("ssim"), stepper("ssim", channels_last=True)
    ms = side_by_side({"contiguous": plain, "channels_last": cl}, device, repeats)
    out["channels_last"] = {**ms, "ratio": round(ms["channels_last"] / ms["contiguous"], 3)}
    del plain, cl
    # the frozen backbone (ScaleKD's first 11 %): no gradients vs gradients computed then dropped
    exp, cfg = _row("ssim", quick, freeze_backbone=1.0)
    steppers = {}
    for name in ("dropped", "not_computed"):
        torch.manual_seed(0)
        distiller = distiller_for(exp, classes, device)
        optimization = build_optimization(distiller.trainable, distiller.student, cfg, device, steps_per_epoch=100)
        if name == "dropped":
            optimization.begin = lambda progress: None  # the earlier way: computed, then set to None in step()
        steppers[name] = (lambda d=distiller, o=optimization: train_one_epoch(d, o, [batch], device=device, epoch=1,
                                                                              total_steps=100))
    ms = side_by_side(steppers, device, repeats)
    out["frozen_backbone"] = {**ms, "ratio": round(ms["not_computed"] / ms["dropped"], 3)}
    del steppers, distiller, optimization
    # SSIM's Gaussian window, cached on the device vs built on the host and copied every call,
    # over the 5 FPN levels of 800x1333, forward + backward (the device path, as CUDA runs it)
    c = 16 if quick else 256
    shapes = [(2, c, 40, 48), (2, c, 20, 24), (2, c, 11, 12)] if quick else \
        [(2, c, 100, 167), (2, c, 50, 84), (2, c, 25, 42), (2, c, 13, 21), (2, c, 7, 11)]
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.rand(*sh, generator=g).to(device).requires_grad_(True), torch.rand(*sh, generator=g).to(device))
             for sh in shapes]
    spec = _check(pairs[0][0], pairs[0][1], 1.0, 1.0, 1.0, 11, 1.5, None, 0.01, 0.03)

    def ssim_levels() -> None:
        total = sum(_device_ssim_mean(x, y, spec, effective_window(x.shape[-2], x.shape[-1], 11, 1.5), False)
                    for x, y in pairs)
        total.backward()

    cached = ssim_module.device_window

    def uncached() -> None:
        ssim_module.device_window = lambda k, s, d, dev: gaussian_window(k, s, dtype=d, device=dev)  # type: ignore
        try:
            ssim_levels()
        finally:
            ssim_module.device_window = cached

    ms = side_by_side({"built_each_call": uncached, "cached": ssim_levels}, device, 3 if quick else 20)
    out["ssim_window"] = {**ms, "ratio": round(ms["cached"] / ms["built_each_call"], 3)}
    del pairs
    # CSA's attention at P3 of 800x1333 (100x167 tokens), ratios 1,2,4,8: fused kernels vs the math kernel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kdsweep.methods.scalekd.csa import MultiScaleCrossAttention

    dim, hw = (16, (20, 24)) if quick else (256, (100, 167))
    attention = MultiScaleCrossAttention(dim, dim, num_heads=8, ratios=(1, 2, 4, 8)).to(device)
    q = torch.randn(2, dim, *hw, device=device, requires_grad=True)
    k = torch.randn(2, dim, *hw, device=device)

    def csa(backends: list[Any]) -> Callable[[], None]:
        def run() -> None:
            with sdpa_kernel(backends):
                attention(q, k, q).float().pow(2).mean().backward()
        return run

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    peaks = {}
    for name, backends in (("math", [SDPBackend.MATH]), ("fused", fused)):
        reset_peak(device)
        csa(backends)()
        peaks[name] = peak_gib(device)
    ms = side_by_side({"math": csa([SDPBackend.MATH]), "fused": csa(fused)}, device, 2 if quick else 10)
    out["csa_attention"] = {**ms, "ratio": round(ms["fused"] / ms["math"], 3),
                            "peak_GiB_math": peaks["math"], "peak_GiB_fused": peaks["fused"],
                            "tokens": hw[0] * hw[1], "dtype": "float32 (KD terms compute in float32)"}
    out["ok"] = True
    return out


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
SECTIONS = ("amp", "nccl", "ddp_amp", "paper_step", "largest", "checkpoint", "evaluate", "speedups", "collectives", "ssim",
            "throughput")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke version; no time budget)")
    parser.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--json", help="also write the summary here ($OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--wheels", default=str(WHEELS), help=f"folder of the wheels to install from (default {WHEELS})")
    parser.add_argument("--fetch-wheels", action="store_true", help="download the wheels a bare GPU machine lacks, then exit")
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(Path(args.wheels))
    wanted = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [name for name in wanted if name not in SECTIONS]
    if unknown:
        print(f"gpu_check: unknown section '{unknown[0]}'; use {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    start = time.time()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "wheels": ensure_wheels(Path(args.wheels)), "quick": args.quick, "sections": {},
    }
    if device.type != "cuda":
        summary["note"] = "no CUDA device: the CPU smoke version; nothing here confirms GPU figures"
    print(f"gpu_check on {summary['device']} (torch {summary['torch']}, Python {summary['python']}); wheels: "
          f"{json.dumps(summary['wheels'])}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="kdsweep-gpu-check-"))
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "amp": lambda: section_amp(device, args.quick),
        "nccl": lambda: section_nccl(device, args.quick),
        "ddp_amp": lambda: section_ddp_amp(device, args.quick),
        "paper_step": lambda: section_paper_step(device, args.quick, workdir),
        "largest": lambda: section_largest(device, args.quick),
        "checkpoint": lambda: section_checkpoint(device, args.quick, workdir),
        "evaluate": lambda: section_evaluate(device, args.quick, workdir),
        "speedups": lambda: section_speedups(device, args.quick),
        "collectives": lambda: section_collectives(device, args.quick),
        "ssim": lambda: section_ssim(device, args.quick),
        "throughput": lambda: section_throughput(device, args.quick),
    }
    for name in wanted:
        if not args.quick and time.time() - start > BUDGET_S:
            summary["sections"][name] = {"skipped": f"time budget of {BUDGET_S:.0f} s used up"}
            continue
        began = time.time()
        try:
            result = runners[name]()
        except Skip as exc:
            result = {"skipped": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one failing section must not hide the others
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000], "trace": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.time() - began, 1)
        summary["sections"][name] = result
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[{name}] {json.dumps({k: v for k, v in result.items() if k != 'trace'})}", flush=True)
        write_summary(summary, args.json, start)  # after every section: a killed run keeps what it measured
    write_summary(summary, args.json, start)
    failed = summary["failed"]
    print(f"gpu_check: {len(summary['sections'])} section(s) in {summary['seconds']} s on {summary['device']}; "
          f"failed: {', '.join(failed) or 'none'}; skipped: "
          f"{', '.join(n for n, r in summary['sections'].items() if 'skipped' in r) or 'none'}")
    return 1 if failed else 0


def write_summary(summary: dict[str, Any], path: str | None, start: float) -> None:
    """The summary as JSON at ``path`` and at ``$OUT/gpu_check.json`` (what ``cost_model.py
    --gpu-check`` reads: the device's name and the paper step)."""
    summary["seconds"] = round(time.time() - start, 1)
    summary["section_seconds"] = {n: r.get("seconds") for n, r in summary["sections"].items()}
    summary["failed"] = [n for n, r in summary["sections"].items() if r.get("ok") is False]
    text = json.dumps(summary, indent=1, default=str)
    for target in filter(None, (path, os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)):
        Path(target).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
