"""``train_fn_per_worker``: what every Ray Train worker runs, for any run (a teacher's or a student's).

The loop config::

    {"experiment": ExperimentConfig,            # the run's typed config, as the driver built it
     "data": {"train_ann", "val_ann", "train_images", "val_images"},   # absolute paths
     "teacher_state": ObjectRef | state_dict | None, "label": str}

A teacher's run is ``teacher_experiment(exp)`` (the teacher as the student, no KD terms), so
nothing here branches on a role. Every epoch it trains, COCO-evaluates the whole val set (sharded,
gathered to rank 0) when :func:`evaluates` says so, saves a checkpoint (rank 0, :mod:`kdsweep.train.checkpoint`) and calls
``ray.train.report``. A restarted run resumes from the latest checkpoint, and first reports that
checkpoint's epoch again, flagged :data:`kdsweep.names.REPLAYED` (for a launcher that never
received it).
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from kdsweep.config import ExperimentConfig, TrainConfig
from kdsweep.data.loader import build_loaders
from kdsweep.models.init_student import maybe_init_student
from kdsweep.names import REPLAYED
from kdsweep.train import collective_check
from kdsweep.train.checkpoint import load_checkpoint, read_metrics, save_checkpoint, write_metrics
from kdsweep.train.collectives import count_distinct
from kdsweep.train.distiller import Distiller
from kdsweep.train.engine import console, evaluate, train_one_epoch
from kdsweep.train.model import build_model
from kdsweep.train.optim import build_optimization, float32_settings

__all__ = ["evaluates", "prepare_distiller", "seed_everything", "train_fn_per_worker"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def evaluates(epoch: int, cfg: TrainConfig) -> bool:
    """Whether ``epoch`` (1-based) is COCO-evaluated: every ``cfg.eval_every`` epochs, and the
    last one always (``eval_every`` 0: the last one only)."""
    return epoch == cfg.epochs or (cfg.eval_every > 0 and epoch % cfg.eval_every == 0)


def count_nodes(device: torch.device) -> int:
    """Number of distinct Ray nodes among the run's workers (1 without DDP); the node ids are
    compared as int64 codes all-gathered on ``device`` (:func:`kdsweep.train.collectives.count_distinct`)."""
    return count_distinct(ray.get_runtime_context().get_node_id(), device)


def prepare_distiller(
    distiller: Distiller, world: int, device: torch.device,
    prepare: Callable[[torch.nn.Module], torch.nn.Module] = ray.train.torch.prepare_model,
    channels_last: bool = False,
) -> int:
    """Make ``distiller`` ready to train on ``world`` workers, in place: with more than one worker
    its trainable BatchNorm becomes synchronised BatchNorm (:meth:`Distiller.sync_batchnorm`:
    ``nn.SyncBatchNorm`` on GPUs, :class:`~kdsweep.train.distiller.HostSyncBatchNorm` on the CPU,
    where torch's refuses to run; the frozen teacher is never converted), then it moves to
    ``device`` and its trainable part is wrapped by ``prepare`` (DDP). ``channels_last``: the
    backbones go to channels-last memory format first (``TrainConfig.channels_last``).

    Without it a from-scratch student (``weights: null``: nn.BatchNorm2d with trainable
    statistics) normalised each rank's 2 images alone, and DDP broadcast rank 0's running
    statistics every step (He et al., "Rethinking ImageNet Pre-training", ICCV 2019: SyncBN).
    ImageNet backbones use FrozenBatchNorm2d and the heads GroupNorm: nothing to convert there.

    Returns:
        The number of BatchNorm layers converted.
    """
    synced = distiller.sync_batchnorm(device) if world > 1 else 0
    if channels_last:
        distiller.channels_last()
    distiller.to(device)
    distiller.wrap(prepare)
    return synced


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (see the module docstring for ``config``).

    With ``KDSWEEP_CHECK_COLLECTIVES=1`` in the worker's environment the whole run goes under
    :func:`kdsweep.train.collective_check.guard`: a host tensor reaching a collective fails the run
    on the CPU as NCCL would on GPUs (the tests' multi-worker runs set it).
    """
    checking = os.environ.get(collective_check.ENV_FLAG) == "1"
    with collective_check.guard() if checking else contextlib.nullcontext():
        _run_worker(config)


def _run_worker(config: dict[str, Any]) -> None:
    exp: ExperimentConfig = config["experiment"]
    cfg = exp.train
    torch.set_num_threads(cfg.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed * 1000 + rank)
    device = ray.train.torch.get_device()
    log = console(f"{config.get('label', 'run')} r{rank}") if rank == 0 else None

    loaders = build_loaders(config["data"], exp, cfg, rank, world, device)
    train_loader, val_ds = loaders.train, loaders.val_set
    state = config.get("teacher_state")
    if state is not None and not isinstance(state, Mapping):  # an ObjectRef of the teacher's weights
        state = ray.get(state)
    distiller = build_model(exp, val_ds.num_classes, state)
    maybe_init_student(distiller, cfg.init_student, resuming=ray.train.get_checkpoint() is not None, log=log)
    float32_settings(cfg)
    synced = prepare_distiller(distiller, world, device, channels_last=cfg.channels_last)
    if log and synced:
        log(f"{synced} BatchNorm layers synchronised across the {world} workers (SyncBatchNorm)")
    iters = len(train_loader) if cfg.max_iters_per_epoch is None else min(len(train_loader), cfg.max_iters_per_epoch)
    optimization = build_optimization(distiller.trainable, distiller.student, cfg, device, iters)
    optimization.rewrap = lambda: distiller.rewrap(ray.train.torch.prepare_model)

    start_epoch = 1
    saved: dict[str, Any] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_epoch = load_checkpoint(directory, distiller, optimization)
            saved = read_metrics(directory)
        if log:
            log(f"resumed from checkpoint, continuing at epoch {start_epoch}")
    if saved:
        # the checkpoint's epoch again, flagged: its launcher may have been stopped after the
        # workers saved it but before their report reached Tune and MLflow (MLflow logs it only
        # if it is missing). Only the newest checkpoint's epoch: with two epochs saved and never
        # reported, the older one stays missing. When every epoch was done, it is also the run's
        # last result, whose start_epoch then says that nothing was left to train.
        replay = {**saved, REPLAYED: 1}
        if start_epoch > cfg.epochs:
            replay["start_epoch"] = start_epoch
        ray.train.report(replay)
    if start_epoch > cfg.epochs:
        return

    nodes = count_nodes(device)
    for epoch in range(start_epoch, cfg.epochs + 1):
        loaders.sampler.set_epoch(epoch)
        metrics: dict[str, Any] = train_one_epoch(
            distiller, optimization, train_loader, device=device, epoch=epoch, max_iters=cfg.max_iters_per_epoch,
            log=log, step_offset=(epoch - 1) * iters, total_steps=iters * cfg.epochs,
        )
        if evaluates(epoch, cfg):
            metrics.update(
                evaluate(
                    # the ground truth is parsed from the JSON on rank 0 only: COCOeval runs there alone
                    distiller.student, loaders.val, device=device, coco_gt=val_ds.coco_gt if rank == 0 else None,
                    label_to_cat_id=val_ds.label_to_cat_id, image_ids=val_ds.image_ids,
                    amp_dtype=optimization.amp_dtype, evaluator=cfg.evaluator,
                )
            )
        metrics["epoch"] = epoch
        metrics["start_epoch"] = start_epoch  # > 1 after a resume from a checkpoint
        metrics["world_size"] = world
        metrics["nodes"] = nodes  # distinct Ray nodes this run's workers are on
        metrics["lr"] = optimization.lr
        if log:
            scores = f"AP {metrics['AP']:.2f} AP_S {metrics['AP_S']:.2f}" if "AP" in metrics else "not evaluated (eval_every)"
            log(f"epoch {epoch}/{cfg.epochs} {scores} loss {metrics['loss']:.4f}")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, distiller, optimization, epoch)
                write_metrics(tmp, metrics)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
