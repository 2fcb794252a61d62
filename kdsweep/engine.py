"""One training epoch and one evaluation pass (the torchvision ``references/detection`` shape).

Both are plain functions over a :class:`~kdsweep.distiller.Distiller`; distribution (DDP,
sharded evaluation) is handled by the caller through ``torch.distributed`` when initialised.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from kdsweep.evaluation import coco_stats, to_coco_detections


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stops instead of going on with garbage."""


class TrialOutOfMemoryError(RuntimeError):
    """The device ran out of memory; the trial fails with this reason, the sweep goes on."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def move_batch(images: list[Tensor], targets: list[dict[str, Any]], device: torch.device) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Move images (list of (3, H, W)) and target dicts to ``device``."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
    return images, targets


def check_finite(total: Tensor, losses: dict[str, Tensor], *, epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteLossError` when ``total`` is not finite on any worker.

    Under DDP the flag is all-reduced so that every worker stops at the same step (no hang).
    """
    ok = torch.isfinite(total.detach()).to(torch.int32).reshape(1).cpu()
    if _distributed():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if int(ok.item()) == 0:
        parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch} step {step} ({parts}); "
            "lower the learning rate or the KD weights, or enable grad_clip"
        )


def train_one_epoch(
    distiller: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Iterable,
    *,
    device: torch.device,
    epoch: int,
    params: list[Tensor],
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    grad_clip: float | None = None,
    max_iters: int | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 20,
    extra_optimizers: list[torch.optim.Optimizer] = (),
    step_offset: int = 0,
    total_steps: int | None = None,
    frozen: list[Tensor] = (),
    freeze_until: float = 0.0,
) -> dict[str, float]:
    """Train for one epoch; return the mean of every loss term and the throughput.

    Args (beyond the obvious):
        extra_optimizers: stepped after ``optimizer`` (e.g. ScaleKD's assistant has its own Adam).
        step_offset, total_steps: global step of this epoch's first batch and of the whole run;
            ``progress = (step_offset + step) / total_steps`` goes to the distiller (schedules).
        frozen, freeze_until: while ``progress < freeze_until`` the gradients of ``frozen`` are
            dropped (set to None, so no optimizer moves them) after backward.

    Returns:
        ``{"loss": mean total, "loss/<term>": mean per term, "train_images_per_s": ...}``.
    """
    distiller.train()
    sums: dict[str, float] = defaultdict(float)
    steps, images_seen, start = 0, 0, time.perf_counter()
    total_iters = len(loader) if max_iters is None else min(len(loader), max_iters)  # type: ignore[arg-type]
    for step, (images, targets) in enumerate(loader):
        if max_iters is not None and step >= max_iters:
            break
        images, targets = move_batch(images, targets, device)
        progress = (step_offset + step) / total_steps if total_steps else 0.0
        optimizers = [optimizer, *extra_optimizers]
        try:
            with torch.autocast(device.type, enabled=amp):
                losses = distiller(images, targets, progress=progress)
            total = sum(losses.values())
            check_finite(total, losses, epoch=epoch, step=step)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(total).backward()
                for opt in optimizers:
                    scaler.unscale_(opt)
            else:
                total.backward()
        except torch.OutOfMemoryError:
            raise TrialOutOfMemoryError(
                f"out of memory at epoch {epoch} step {step} ({len(images)} images per worker); "
                "lower train.batch_size or the input size, or use a larger device"
            ) from None
        if progress < freeze_until:
            for p in frozen:
                p.grad = None
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        for opt in optimizers:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
        scheduler.step()
        steps += 1
        images_seen += len(images)
        sums["loss"] += float(total.detach())
        for key, value in losses.items():
            sums[f"loss/{key}"] += float(value.detach())
        if log is not None and (step % log_every == 0 or step == total_iters - 1):
            rate = images_seen / max(time.perf_counter() - start, 1e-9)
            log(f"epoch {epoch} step {step + 1}/{total_iters} loss {float(total.detach()):.4f} ({rate:.1f} img/s)")
    elapsed = time.perf_counter() - start
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out["train_images_per_s"] = images_seen / max(elapsed, 1e-9)
    out["epoch_time_s"] = elapsed
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Iterable, device: torch.device) -> list[tuple[int, dict[str, Tensor]]]:
    """Run ``model`` (a torchvision detector) in eval mode; return ``[(image_id, output), ...]``."""
    model.eval()
    results: list[tuple[int, dict[str, Tensor]]] = []
    for images, targets in loader:
        images = [img.to(device) for img in images]
        outputs = model(images)
        for out, tgt in zip(outputs, targets):
            results.append((int(tgt["image_id"]), {k: v.cpu() for k, v in out.items()}))
    return results


def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    coco_gt: Any,
    label_to_cat_id: dict[int, int],
    image_ids: list[int],
) -> dict[str, float]:
    """COCO-evaluate ``model`` on the whole validation set.

    Each worker predicts its own shard (``loader``); detections are gathered from every worker
    and rank 0 runs COCOeval over ``image_ids`` (the full val set), then broadcasts the numbers so
    that every rank reports the same metrics. ``eval_images`` counts the distinct images
    evaluated across all workers (it equals ``len(image_ids)`` when nothing was missed).
    """
    local = predict(model, loader, device)
    records = to_coco_detections((o for _, o in local), (i for i, _ in local), label_to_cat_id)
    seen = [i for i, _ in local]
    if _distributed():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (seen, records))
        seen = [i for ids, _ in gathered for i in ids]
        records = [r for _, part in gathered for r in part]
    stats = coco_stats(coco_gt, records, image_ids) if not _distributed() or dist.get_rank() == 0 else None
    if _distributed():
        box = [stats]
        dist.broadcast_object_list(box, src=0)
        stats = box[0]
    assert stats is not None
    return {**stats, "eval_images": float(len(set(seen)))}


def warmup_cosine(total_iters: int, warmup_iters: int, schedule: str) -> Callable[[int], float]:
    """LR multiplier per iteration: linear warm-up, then cosine / step (x0.1 at 2/3 and 8/9) / constant."""

    def factor(it: int) -> float:
        if warmup_iters > 0 and it < warmup_iters:
            return 0.001 + (1 - 0.001) * it / warmup_iters
        if schedule == "constant":
            return 1.0
        progress = min(max(it - warmup_iters, 0) / max(total_iters - warmup_iters, 1), 1.0)
        if schedule == "step":
            return 0.01 if progress >= 8 / 9 else 0.1 if progress >= 2 / 3 else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def console(prefix: str) -> Callable[[str], None]:
    """A logger that writes ``[prefix] message`` to stdout and flushes (Ray forwards it).

    It writes to ``sys.stdout`` directly: Ray Train V2 patches ``print`` in its workers to both
    tee and log each line, which shows every line twice on the driver.
    """

    def log(message: str) -> None:
        sys.stdout.write(f"[{prefix}] {message}\n")
        sys.stdout.flush()

    return log
