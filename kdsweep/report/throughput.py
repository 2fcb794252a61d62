"""Inference cost of detectors: parameter counts and images/s on this machine.

* :func:`count_params`: every parameter of the detector (what a checkpoint holds).
* :func:`count_inference_params`: only the parameters that take part in an eval-mode forward.
  For torchvision's RetinaNet / FCOS / Faster R-CNN this equals :func:`count_params`; for
  :class:`~kdsweep.methods.mimicdet.model.MimicDet` it leaves out the training-only parts (the T-head,
  the P2 path of the FPN, ``fpn.inner_blocks[0]`` / ``fpn.layer_blocks[0]``), which are built and
  trained but never run at inference.
* :func:`measure_inference`: images/s and ms/image of one model.
* :func:`measure_configs`: several configs measured interleaved (round-robin), so that noise from
  other jobs on the machine hits all of them alike; the median over rounds is reported.

Timing is wall-clock (``time.perf_counter``) of whole eval-mode forwards under
``torch.inference_mode``: the model's ``GeneralizedRCNNTransform`` (resize + normalise), backbone,
heads and post-processing (decoding, NMS). Images are random in [0, 1]. The transform resizes
every image to the model's ``min_size`` / ``max_size``, so measure at the size the model was
configured for (``measure_configs`` does so by default). Weights are random: the network's cost
does not depend on the values, but post-processing does a little (a random-init detector scores
few boxes above its ``score_thresh``, so NMS is cheaper than for a trained model); the numbers
are relative costs on this machine, not deployment figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from kdsweep.config import ExperimentConfig, ModelConfig, config_hash, student_model, teacher_model, to_dict
from kdsweep.models.detectors import build_detector

__all__ = ["count_params", "count_inference_params", "measure_configs", "measure_inference", "row_throughput",
           "throughput_device", "val_classes"]


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (every parameter, trainable or frozen, training-only parts
    included; shared parameters counted once). See :func:`count_inference_params` for the part
    used at inference."""
    return sum(p.numel() for p in model.parameters())


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _default_size(model: nn.Module) -> tuple[int, int]:
    """The model's own resolution (its transform's ``min_size``), else 64 px."""
    transform = getattr(model, "transform", None)
    min_size = getattr(transform, "min_size", None)
    if isinstance(min_size, (tuple, list)) and min_size:
        min_size = min_size[0]
    side = int(min_size) if isinstance(min_size, (int, float)) and min_size > 0 else 64
    return side, side


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode; restore every submodule's training flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (nothing when None); restored afterwards."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads {threads} must be >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _images(model: nn.Module, size: tuple[int, int], batch: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=g).to(_device(model)) for _ in range(batch)]


def count_inference_params(model: nn.Module, size: int | tuple[int, int] | None = None) -> int:
    """Number of parameters used by an eval-mode forward of ``model``.

    Rule: one eval forward of a random image (``size``; default the model's ``min_size``) runs
    under ``torch.inference_mode`` with a forward pre-hook on every submodule; the parameters
    owned directly (``recurse=False``) by the modules that were called are counted, each once.
    Training-only modules that are never called in eval (MimicDet's T-head, P2 lateral/output
    convs) are thereby left out; for torchvision's detectors every module
    runs and the count equals :func:`count_params`. (A parameter read directly off a module whose
    ``forward`` is never called would be missed; neither torchvision's detectors nor MimicDet do
    that.) Training flags of all submodules are restored; BatchNorm statistics are untouched.
    """
    ran: set[nn.Module] = set()
    handles = [
        m.register_forward_pre_hook(lambda module, args: ran.add(module)) for m in model.modules()
    ]
    try:
        with _eval_mode(model), torch.inference_mode():
            model(_images(model, _size_hw(size) if size is not None else _default_size(model), 1))
    finally:
        for handle in handles:
            handle.remove()
    seen: set[int] = set()
    total = 0
    for module in ran:
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def _time_batches(model: nn.Module, images: list[Tensor], iters: int) -> float:
    """Seconds per image over ``iters`` forwards of ``images`` (model already in eval mode)."""
    sync = torch.cuda.synchronize if images[0].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        model(images)
    sync()
    return (time.perf_counter() - start) / (iters * len(images))


def _check(batch: int, warmup: int, iters: int) -> None:
    if batch < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"batch {batch} and iters {iters} must be >= 1, warmup {warmup} >= 0")


def _result(seconds_per_image: float, params: int, inference_params: int) -> dict[str, Any]:
    return {
        "images_per_s": 1.0 / seconds_per_image if seconds_per_image > 0 else math.inf,
        "ms_per_image": 1000.0 * seconds_per_image,
        "params": params,
        "inference_params": inference_params,
    }


def measure_inference(
    model: nn.Module,
    *,
    size: int | tuple[int, int],
    batch: int = 4,
    warmup: int = 2,
    iters: int = 5,
    threads: int | None = None,
) -> dict[str, Any]:
    """Inference throughput of ``model`` on this machine.

    Args:
        model: a detector taking ``list[(3, H, W)]`` in eval mode (torchvision's or MimicDet).
        size: image side, or ``(H, W)``; should match the model's ``min_size``/``max_size`` (its
            transform resizes to those).
        batch: images per forward (random, in [0, 1], on the model's device).
        warmup: untimed forwards first; iters: timed forwards (``time.perf_counter`` around all).
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards); None keeps it.
    Returns:
        ``{"images_per_s", "ms_per_image", "params", "inference_params"}`` (params from
        :func:`count_params` / :func:`count_inference_params`). The model's training flags
        (every submodule's) and torch's thread count are as they were on return.
    """
    _check(batch, warmup, iters)
    hw = _size_hw(size)
    images = _images(model, hw, batch)
    params = count_params(model)
    with _threads(threads):
        inference_params = count_inference_params(model, hw)
        with _eval_mode(model), torch.inference_mode():
            for _ in range(warmup):
                model(images)
            seconds = _time_batches(model, images, iters)
    return _result(seconds, params, inference_params)


def measure_configs(
    configs: Mapping[str, ModelConfig],
    num_classes: int,
    *,
    size: int | tuple[int, int] | None = None,
    batch: int = 4,
    warmup: int = 2,
    iters: int = 5,
    threads: int | None = None,
    rounds: int = 3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, Any]]:
    """Build each config once and measure all of them interleaved.

    Each model is built once by :func:`~kdsweep.models.detectors.build_detector` with random
    weights (``torch.manual_seed(seed)``; throughput does not depend on the values, module doc),
    warmed up with ``warmup`` forwards, then measured round-robin: in each of ``rounds`` rounds,
    every config in turn times ``iters`` forwards of ``batch`` images. Interleaving makes slow
    phases of other jobs on the machine hit every config alike instead of whichever happened to
    run then; the per-config **median** over rounds is reported (``measure_inference``'s keys).

    Args:
        configs: name -> model config (insertion order is the measuring order).
        num_classes: object classes without background (``cfg.num_classes`` wins when > 0).
        size: image side or ``(H, W)`` for every config; None: each config's own ``min_size``
            (square images), so a half-resolution student is measured at its resolution.
        batch, warmup, iters, threads: as :func:`measure_inference`; rounds: >= 1.
        device: where the models run (``cuda``: timed with ``torch.cuda.synchronize``).
    Returns:
        name -> ``{"images_per_s", "ms_per_image", "params", "inference_params"}``.
    """
    _check(batch, warmup, iters)
    if rounds < 1:
        raise ValueError(f"rounds {rounds} must be >= 1")
    models: dict[str, nn.Module] = {}
    images: dict[str, list[Tensor]] = {}
    params: dict[str, tuple[int, int]] = {}
    torch.manual_seed(seed)
    for name, cfg in configs.items():
        model = build_detector(cfg, num_classes).eval().to(device)
        hw = _size_hw(size) if size is not None else (cfg.min_size, cfg.min_size)
        models[name] = model
        images[name] = _images(model, hw, batch, seed)
        params[name] = (count_params(model), 0)
    times: dict[str, list[float]] = {name: [] for name in models}
    with _threads(threads), torch.inference_mode():
        for name, model in models.items():
            params[name] = (params[name][0], count_inference_params(model, tuple(images[name][0].shape[-2:])))
            for _ in range(warmup):
                model(images[name])
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(_time_batches(model, images[name], iters))
    return {name: _result(statistics.median(times[name]), *params[name]) for name in models}


def val_classes(data: Mapping[str, str]) -> int:
    """Object classes of the validation annotations (at least 1)."""
    return len(json.loads(Path(data["val_ann"]).read_text()).get("categories", [])) or 1


def throughput_device(rows: Mapping[str, ExperimentConfig], cluster: Mapping[str, float]) -> tuple[str | None, str]:
    """Where the throughput columns are measured: on the CPU for CPU trials, on a GPU for trials
    that train on GPUs (never CPU images/s for a GPU run), or nowhere when those trials find no
    GPU in ``cluster`` (``ray.cluster_resources()``). Returns ``(device or None, why)``."""
    if not any(exp.train.use_gpu for exp in rows.values()):
        return "cpu", "measured on this machine's CPU, as the trials trained"
    if float(cluster.get("GPU", 0.0)) >= 1:
        return "cuda", "measured on one GPU of the cluster, as the trials trained"
    return None, ("left out: the trials train on GPUs and the cluster has no GPU to measure on "
                  "(CPU images/s would not describe them)")


def row_throughput(rows: Mapping[str, ExperimentConfig], num_classes: int, with_teacher: bool,
                   quick: bool = False, device: str = "cpu") -> dict[str, dict[str, float]]:
    """The throughput columns of an ablation table, per row label (and ``teacher``: the first
    distilling row's, at its resolution; a table with several teachers shows that one): ``params_M``
    (inference parameters, millions), ``infer_img_s`` (images/s on ``device``, the models
    measured interleaved by :func:`measure_configs`) and ``infer_speedup`` (vs the teacher). Rows
    with the same student config share one measurement; ``quick``: a short measurement."""
    unique: dict[str, Any] = {}
    label_key: dict[str, str] = {}
    for label, exp in rows.items():
        cfg = dataclasses.replace(student_model(exp), weights=None)  # at its resolution, its deconvolution included
        key = config_hash(to_dict(cfg))
        unique.setdefault(key, cfg)
        label_key[label] = key
        if with_teacher and exp.kd and "teacher" not in unique:  # as it runs: at its own resolution
            unique["teacher"] = dataclasses.replace(teacher_model(exp), weights=None)
    settings = {"batch": 2, "iters": 2, "rounds": 1} if quick else {"batch": 4, "iters": 5, "rounds": 3}
    measured = measure_configs(unique, num_classes, device=device, **settings)
    out: dict[str, dict[str, float]] = {}
    teacher_rate = measured["teacher"]["images_per_s"] if "teacher" in measured else None
    for label, key in [*label_key.items(), *((("teacher", "teacher"),) if "teacher" in measured else ())]:
        m = measured[key]
        out[label] = {"params_M": m["inference_params"] / 1e6, "infer_img_s": m["images_per_s"]}
        if teacher_rate:
            out[label]["infer_speedup"] = m["images_per_s"] / teacher_rate
    return out

