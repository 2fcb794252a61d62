"""``train_fn_per_worker``: what every Ray Train worker runs, for a teacher or a student.

The loop config (all plain data plus one optional ObjectRef) is::

    {"experiment": <ExperimentConfig as dict>, "role": "teacher" | "student",
     "data": {"train_ann", "val_ann", "train_images", "val_images"},   # absolute paths
     "teacher_state": ObjectRef | state_dict | None, "label": str}

Every epoch it trains, COCO-evaluates the whole val set (sharded, gathered), saves a checkpoint
(rank 0: student weights in ``model.pt``; model/optimizer/scheduler/epoch in ``state.pt``) and
calls ``ray.train.report``. A restarted run resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from kdsweep.train import collective_check
from kdsweep.train.collectives import count_distinct
from kdsweep.config import ExperimentConfig, TrainConfig, from_dict
from kdsweep.data.coco import CocoDetection, collate
from kdsweep.train.distiller import Distiller, build_distiller
from kdsweep.train.engine import console, evaluate, train_one_epoch, warmup_cosine
from kdsweep.models.detectors import build_detector, load_state

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_loaders(
    data: dict[str, str], exp: ExperimentConfig, train_cfg: TrainConfig, rank: int, world: int
) -> tuple[DataLoader, DataLoader, DistributedSampler, CocoDetection]:
    """Train loader with a DistributedSampler; val loader over this rank's shard (no padding)."""
    train_ds = CocoDetection(data["train_ann"], data["train_images"], max_images=exp.data.max_train_images)
    val_ds = CocoDetection(data["val_ann"], data["val_images"], max_images=exp.data.max_val_images)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=train_cfg.seed, drop_last=True)
    train_loader = DataLoader(train_ds, batch_size=train_cfg.batch_size, sampler=sampler, collate_fn=collate, num_workers=0, drop_last=True)
    shard = Subset(val_ds, list(range(rank, len(val_ds), world)))
    val_loader = DataLoader(shard, batch_size=train_cfg.eval_batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    return train_loader, val_loader, sampler, val_ds


def build_model(exp: ExperimentConfig, role: str, num_classes: int, teacher_state: Mapping[str, Any] | None = None) -> Distiller:
    """The Distiller a run of ``role`` trains: the bare teacher (built from ``exp.teacher``, its
    initial weights included), or the student with the frozen teacher (built without initial
    weights, then loaded with ``teacher_state``, the trained teacher's state_dict).

    ``num_classes`` is the dataset's class count (a model's own ``num_classes`` wins when set).
    :mod:`kdsweep.orchestrate.preflight` calls this very function before anything starts.
    """
    if role == "teacher":
        return Distiller(build_detector(exp.teacher, num_classes))
    teacher = None
    if exp.kd:
        if teacher_state is None:
            raise ValueError("KD terms are configured but no teacher weights were given")
        teacher = build_detector(dataclasses.replace(exp.teacher, weights=None), num_classes)
        load_state(teacher, teacher_state, "teacher weights")
    return build_distiller(exp, num_classes, teacher)


def make_optimizer(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def split_params(distiller: Distiller) -> tuple[list[torch.Tensor], list[torch.optim.Optimizer]]:
    """Trainable parameters of the main optimizer, and one optimizer per term that wants its own.

    A KD term with an ``optimizer_spec`` attribute (``{"name": "adam"|"adamw"|"sgd", "lr": ...,
    "weight_decay": ...}``, e.g. ScaleKD's cross-scale assistant: Adam, lr 3e-4, wd 1e-4) gets a
    separate optimizer at a constant learning rate; everything else trains under ``optimizer``.
    """
    inner = unwrap(distiller.trainable)
    owned: set[int] = set()
    extra: list[torch.optim.Optimizer] = []
    for term in getattr(inner, "terms", {}).values():
        spec = getattr(term, "optimizer_spec", None)
        own = [p for p in term.parameters() if p.requires_grad]
        if not spec or not own:
            continue
        owned.update(id(p) for p in own)
        kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[spec.get("name", "adam")]
        extra.append(kind(own, lr=spec.get("lr", 3e-4), weight_decay=spec.get("weight_decay", 0.0)))
    main = [p for p in distiller.trainable.parameters() if p.requires_grad and id(p) not in owned]
    return main, extra


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper, or the module itself."""
    return getattr(module, "module", module)


def save_checkpoint(directory: str, distiller: Distiller, optimizer, scheduler, scaler, epoch: int,
                    extra_optimizers: list[torch.optim.Optimizer] = ()) -> None:
    """Write ``model.pt`` (student state_dict, loadable as detector weights) and ``state.pt``."""
    torch.save({"model": distiller.student.state_dict()}, os.path.join(directory, MODEL_FILE))
    torch.save(
        {
            "trainable": unwrap(distiller.trainable).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "extra_optimizers": [opt.state_dict() for opt in extra_optimizers],
            "epoch": epoch,
        },
        os.path.join(directory, STATE_FILE),
    )


def load_checkpoint(directory: str, distiller: Distiller, optimizer, scheduler, scaler,
                    extra_optimizers: list[torch.optim.Optimizer] = ()) -> int:
    """Restore from ``state.pt``; return the next epoch to run."""
    state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    unwrap(distiller.trainable).load_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    for opt, opt_state in zip(extra_optimizers, state.get("extra_optimizers", [])):
        opt.load_state_dict(opt_state)
    return int(state["epoch"]) + 1


def count_nodes(device: torch.device) -> int:
    """Number of distinct Ray nodes among the run's workers (1 without DDP); the node ids are
    compared as int64 codes all-gathered on ``device`` (:func:`kdsweep.train.collectives.count_distinct`)."""
    import ray

    return count_distinct(ray.get_runtime_context().get_node_id(), device)


def amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype | None, torch.amp.GradScaler | None]:
    """``(enabled, dtype, scaler)`` of mixed precision for ``cfg`` on ``device``.

    ``amp_dtype: auto`` is float16 on CUDA (with a ``GradScaler``: float16 gradients underflow
    without loss scaling) and bfloat16 elsewhere (the CPU's autocast dtype; bfloat16 has float32's
    exponent range, so it needs no scaler). An explicit ``float16`` gets a ``GradScaler`` on any
    device that has one (the CPU too, in torch >= 2.3).
    """
    if not cfg.amp:
        return False, None, None
    name = cfg.amp_dtype if cfg.amp_dtype != "auto" else ("float16" if device.type == "cuda" else "bfloat16")
    dtype = getattr(torch, name)
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    return True, dtype, scaler


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (see module docstring for ``config``).

    With ``KDSWEEP_CHECK_COLLECTIVES=1`` in the worker's environment the whole run goes under
    :func:`kdsweep.train.collective_check.guard`: a host tensor reaching a collective fails the run on
    the CPU as NCCL would on GPUs (the tests' multi-worker runs set it).
    """
    checking = os.environ.get(collective_check.ENV_FLAG) == "1"
    with collective_check.guard() if checking else contextlib.nullcontext():
        _run_worker(config)


def _run_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    exp: ExperimentConfig = from_dict(ExperimentConfig, config["experiment"])
    role = config["role"]
    cfg = exp.teacher_train if role == "teacher" else exp.train
    torch.set_num_threads(cfg.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed * 1000 + rank)
    device = ray.train.torch.get_device()
    log = console(f"{config.get('label', role)} r{rank}") if rank == 0 else None

    train_loader, val_loader, sampler, val_ds = build_loaders(config["data"], exp, cfg, rank, world)
    state = config.get("teacher_state")
    if state is not None and not isinstance(state, Mapping):  # an ObjectRef of the teacher's weights
        state = ray.get(state)
    distiller = build_model(exp, role, val_ds.num_classes, state)
    distiller.to(device)
    distiller.wrap(ray.train.torch.prepare_model)
    main_params, extra_optimizers = split_params(distiller)
    params = [p for p in distiller.trainable.parameters() if p.requires_grad]
    optimizer = make_optimizer(main_params, cfg)
    frozen = list(distiller.student.backbone.body.parameters()) if cfg.freeze_backbone > 0 else []
    iters = len(train_loader) if cfg.max_iters_per_epoch is None else min(len(train_loader), cfg.max_iters_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(max(iters * cfg.epochs, 1), min(cfg.warmup_iters, iters * cfg.epochs // 2), cfg.lr_schedule)
    )
    amp, amp_dtype, scaler = amp_settings(cfg, device)

    start_epoch = 1
    saved: dict[str, Any] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_epoch = load_checkpoint(directory, distiller, optimizer, scheduler, scaler, extra_optimizers)
            saved = read_metrics(directory)
        if log:
            log(f"resumed from checkpoint, continuing at epoch {start_epoch}")
    if start_epoch > cfg.epochs and saved:
        # every epoch was done before the interruption (the workers outlived their Tune trial):
        # report the last epoch's metrics again, so that Tune and MLflow end with them
        ray.train.report({**saved, "start_epoch": start_epoch})
        return

    nodes = count_nodes(device)
    for epoch in range(start_epoch, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        metrics: dict[str, Any] = train_one_epoch(
            distiller, optimizer, scheduler, train_loader, device=device, epoch=epoch, params=params,
            scaler=scaler, amp=amp, amp_dtype=amp_dtype, grad_clip=cfg.grad_clip, max_iters=cfg.max_iters_per_epoch, log=log,
            extra_optimizers=extra_optimizers, step_offset=(epoch - 1) * iters, total_steps=iters * cfg.epochs,
            frozen=frozen, freeze_until=cfg.freeze_backbone,
        )
        metrics.update(
            evaluate(
                distiller.student, val_loader, device=device, coco_gt=val_ds.coco_gt,
                label_to_cat_id=val_ds.label_to_cat_id, image_ids=val_ds.image_ids,
            )
        )
        metrics["epoch"] = epoch
        metrics["start_epoch"] = start_epoch  # > 1 after a resume from a checkpoint
        metrics["world_size"] = world
        metrics["nodes"] = nodes  # distinct Ray nodes this run's workers are on
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        if log:
            log(f"epoch {epoch}/{cfg.epochs} AP {metrics['AP']:.2f} AP_S {metrics['AP_S']:.2f} loss {metrics['loss']:.4f}")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, distiller, optimizer, scheduler, scaler, epoch, extra_optimizers)
                write_metrics(tmp, metrics)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def write_metrics(directory: str, metrics: dict[str, Any]) -> None:
    """The epoch's numeric metrics as ``metrics.json`` beside the weights in a checkpoint."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    Path(directory, METRICS_FILE).write_text(json.dumps(numbers))


def read_metrics(directory: str) -> dict[str, Any]:
    """The metrics saved with a checkpoint ({} for checkpoints written before they were saved)."""
    path = Path(directory, METRICS_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def student_weights_path(checkpoint_dir: str | Path) -> Path:
    """Path of the student weights file inside a checkpoint directory."""
    return Path(checkpoint_dir) / MODEL_FILE
