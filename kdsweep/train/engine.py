"""One training epoch and one evaluation pass (the torchvision ``references/detection`` shape).

Both are plain functions over a :class:`~kdsweep.train.distiller.Distiller`. Under a process group
(Ray Train's DDP) they reduce and gather through :mod:`kdsweep.train.collectives`, always on tensors of
the training device.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from kdsweep.kd.precision import float32_decoding
from kdsweep.train.collectives import all_true, broadcast_values, gather_rows, mean_over_workers, world_size
from kdsweep.train.evaluation import STAT_NAMES, coco_stats, detection_rows, records_from_rows
from kdsweep.train.optim import Optimization


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stops instead of going on with garbage."""


class TrialOutOfMemoryError(RuntimeError):
    """The device ran out of memory; the trial fails with this reason, the sweep goes on."""


def images_to(images: list[Tensor], device: torch.device) -> list[Tensor]:
    """Images ``(3, H, W)`` on ``device`` as float32 in [0, 1]: uint8 ones (as the loader gives
    them, a quarter of the bytes to copy) are converted there, ``x / 255``."""
    out = [img.to(device, non_blocking=True) for img in images]
    return [img.float().div_(255.0) if img.dtype == torch.uint8 else img for img in out]


def move_batch(images: list[Tensor], targets: list[dict[str, Any]], device: torch.device) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Move images (list of (3, H, W), uint8 or float; float32 on ``device``, :func:`images_to`)
    and target dicts to ``device``."""
    images = images_to(images, device)
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
    return images, targets


def check_finite(total: Tensor, losses: dict[str, Tensor], *, epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteLossError` when ``total`` is not finite on any worker.

    The flag stays on ``total``'s device through the all-reduce (NCCL takes only CUDA tensors),
    then one host read per step tells every worker the same thing, so all of them stop at the same
    step (no hang). The loss values are read on the host only to word the error.
    """
    if all_true(torch.isfinite(total.detach())):
        return
    parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    raise NonFiniteLossError(
        f"non-finite loss at epoch {epoch} step {step} ({parts}); "
        "lower the learning rate or the KD weights, or enable grad_clip"
    )


def train_one_epoch(
    distiller: torch.nn.Module,
    optimization: Optimization,
    loader: Iterable,
    *,
    device: torch.device,
    epoch: int,
    max_iters: int | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 20,
    step_offset: int = 0,
    total_steps: int | None = None,
) -> dict[str, float]:
    """Train for one epoch; return the mean of every loss term over the workers, and throughput.

    Args (beyond the obvious):
        optimization: what updates the parameters (:class:`~kdsweep.train.optim.Optimization`:
            optimizers, schedule, GradScaler, clipping, autocast dtype). The forward runs under
            ``torch.autocast(device.type, dtype=optimization.amp_dtype)`` when that is set; KD
            terms compute in float32 inside it (see :class:`~kdsweep.train.distiller.Trainable`),
            and so do the student's anchors, box targets and losses
            (:func:`~kdsweep.kd.precision.float32_decoding`).
        step_offset, total_steps: global step of this epoch's first batch and of the whole run;
            ``progress = (step_offset + step) / total_steps`` goes to the distiller (the terms'
            schedules) and to the optimization (the terms' optimizers, the frozen backbone).

    Host syncs: one per step (the finiteness flag, all-reduced on the device), one per log line,
    and one at the end (the loss means, all-reduced on the device). Loss sums accumulate on the
    device.

    Returns:
        ``{"loss": mean total, "loss/<term>": mean per term, "train_images_per_s": images per
        second of all workers together, "epoch_time_s": ...}``.
    """
    distiller.train()
    # under AMP the student's anchors, box targets and losses in float32 (float32_decoding's docstring)
    boxes = float32_decoding(getattr(distiller, "student", distiller)) if optimization.amp else contextlib.nullcontext()
    sums: dict[str, Tensor] = {}
    steps, images_seen, start = 0, 0, time.perf_counter()
    total_iters = len(loader) if max_iters is None else min(len(loader), max_iters)  # type: ignore[arg-type]
    with boxes:
        for step, (images, targets) in enumerate(loader):
            if max_iters is not None and step >= max_iters:
                break
            images, targets = move_batch(images, targets, device)
            progress = (step_offset + step) / total_steps if total_steps else 0.0
            optimization.begin(progress)  # the frozen backbone's span (no gradients, no reduction)
            try:
                with torch.autocast(device.type, dtype=optimization.amp_dtype, enabled=optimization.amp):
                    losses = distiller(images, targets, progress=progress)
                total = sum(losses.values())
                check_finite(total, losses, epoch=epoch, step=step)
                optimization.zero_grad()
                optimization.backward(total)
            except torch.OutOfMemoryError:
                raise TrialOutOfMemoryError(
                    f"out of memory at epoch {epoch} step {step} ({len(images)} images per worker); "
                    "lower train.batch_size or the input size, or use a larger device"
                ) from None
            optimization.step(progress)
            steps += 1
            images_seen += len(images)
            for key, value in (("loss", total), *((f"loss/{k}", v) for k, v in losses.items())):
                value = value.detach().float()
                sums[key] = sums[key] + value if key in sums else value
            if log is not None and (step % log_every == 0 or step == total_iters - 1):
                rate = images_seen / max(time.perf_counter() - start, 1e-9)
                log(f"epoch {epoch} step {step + 1}/{total_iters} loss {float(total.detach()):.4f} ({rate:.1f} img/s)")
    elapsed = time.perf_counter() - start
    keys = list(sums)
    local = torch.zeros(len(keys) + 1, device=device)
    if keys:
        local[:-1] = torch.stack([sums[k] for k in keys]) / max(steps, 1)
    local[-1] = images_seen / max(elapsed, 1e-9)
    means = mean_over_workers(local).tolist()  # the epoch's one host read of the losses
    out = dict(zip(keys, means[:-1]))
    out["train_images_per_s"] = means[-1] * world_size()
    out["epoch_time_s"] = elapsed
    return out


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
) -> list[tuple[int, dict[str, Tensor]]]:
    """Run ``model`` (a torchvision detector, or MimicDet) in eval mode; return
    ``[(image_id, output), ...]`` with the outputs (``boxes`` (K, 4) xyxy in original-image
    pixels, ``scores`` (K,), ``labels`` (K,)) left on ``device``.

    Args:
        amp_dtype: run the backbone and heads under ``torch.autocast(device.type, dtype=amp_dtype)``
            (the training run's AMP dtype, float16 or bfloat16), but decode every box in float32:
            the feature maps and head outputs are cast to float32 before the anchors, the box
            decoding, the score thresholds, NMS and the rescaling use them
            (:func:`float32_decoding`). The boxes then equal a float32 decode of the same head
            outputs; the outputs are float32. None (the default): no autocast, and the outputs are
            returned exactly as the model gave them.
    """
    model.eval()
    results: list[tuple[int, dict[str, Tensor]]] = []
    with contextlib.ExitStack() as stack:
        if amp_dtype is not None:
            stack.enter_context(float32_decoding(model))
        for images, targets in loader:
            images = images_to(images, device)
            if amp_dtype is None:
                outputs = model(images)
            else:
                with torch.autocast(device.type, dtype=amp_dtype):
                    outputs = model(images)
                outputs = [{k: (v.float() if isinstance(v, Tensor) and v.is_floating_point() else v)
                            for k, v in out.items()} for out in outputs]
            for out, tgt in zip(outputs, targets):
                results.append((int(tgt["image_id"]), out))
    return results


def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    coco_gt: Any,
    label_to_cat_id: dict[int, int],
    image_ids: list[int],
    amp_dtype: torch.dtype | None = None,
    evaluator: str = "pycocotools",
) -> dict[str, float]:
    """COCO-evaluate ``model`` on the whole validation set (``evaluator``: see
    :func:`~kdsweep.train.evaluation.coco_stats`).

    Each worker predicts its own shard (``loader``; under autocast in ``amp_dtype`` when given,
    see :func:`predict`) and packs its detections into rows on the device
    (:func:`~kdsweep.train.evaluation.detection_rows`); the rows are gathered as tensors to rank 0
    only (:func:`~kdsweep.train.collectives.gather_rows`), which unpacks them and runs COCOeval over
    ``image_ids`` (the full val set), then broadcasts the numbers as a tensor so that every rank
    reports the same metrics. ``eval_images`` counts the distinct images evaluated across all
    workers (it equals ``len(image_ids)`` when nothing was missed). Only rank 0 reads ``coco_gt``;
    the other ranks may pass None.
    """
    local = predict(model, loader, device, amp_dtype=amp_dtype)
    rows = detection_rows(local, device)
    gathered = gather_rows(rows, dst=0)
    values = torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64, device=device)
    if gathered is not None:  # rank 0 (or a single worker)
        records, seen = records_from_rows(gathered.cpu(), label_to_cat_id)
        stats = coco_stats(coco_gt, records, image_ids, evaluator=evaluator)
        values = torch.tensor([*(stats[n] for n in STAT_NAMES), float(len(seen))], dtype=torch.float64, device=device)
    numbers = broadcast_values(values, src=0).tolist()
    return {**dict(zip(STAT_NAMES, numbers[:-1])), "eval_images": numbers[-1]}


def console(prefix: str) -> Callable[[str], None]:
    """A logger that writes ``[prefix] message`` to stdout and flushes (Ray forwards it).

    It writes to ``sys.stdout`` directly: Ray Train V2 patches ``print`` in its workers to both
    tee and log each line, which shows every line twice on the driver.
    """

    def log(message: str) -> None:
        sys.stdout.write(f"[{prefix}] {message}\n")
        sys.stdout.flush()

    return log
