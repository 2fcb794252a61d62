"""The DataLoaders of a Ray Train worker: what a GPU needs to stay fed.

* decoding in ``loader_workers`` processes (``auto``: the worker's CPUs minus one), each with one
  torch thread, ``persistent_workers`` and a prefetch of :data:`PREFETCH` batches per process;
* pinned memory on CUDA, so that ``.to(device, non_blocking=True)`` overlaps the copy;
* uint8 images (float conversion on the device, :func:`kdsweep.train.engine.move_batch`);
* aspect-ratio grouped training batches (:mod:`kdsweep.data.batching`) and random horizontal
  flips (:class:`kdsweep.data.dataset.CocoDetection`), as the run's :class:`TrainConfig` says;
* the validation set sharded over the ranks, never flipped, never grouped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from kdsweep.config import ExperimentConfig, TrainConfig
from kdsweep.data.batching import GroupedBatchSampler, aspect_ratio_groups
from kdsweep.data.coco import DataError
from kdsweep.data.dataset import CocoDetection, collate

__all__ = ["Loaders", "build_loaders", "check_steps", "loader_processes", "steps_per_epoch"]

PREFETCH = 4  # batches per loader process


@dataclass
class Loaders:
    """A worker's loaders: ``sampler`` needs ``set_epoch`` every epoch; ``val_set`` is the whole
    validation set (its ``coco_gt``, ``image_ids`` and label mapping), ``val`` this rank's shard."""

    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler
    val_set: CocoDetection


def loader_processes(cfg: TrainConfig) -> int:
    """DataLoader processes per Ray Train worker: ``loader_workers``, or for ``auto`` the
    worker's CPUs minus one (one CPU runs the training loop)."""
    if cfg.loader_workers == "auto":
        return max(0, int(cfg.cpus_per_worker) - 1)
    return int(cfg.loader_workers)


def _one_thread(_: int) -> None:
    """A loader process decodes; its torch ops must not start a thread per core each."""
    torch.set_num_threads(1)


def _options(processes: int, device: torch.device, *, persistent: bool) -> dict[str, Any]:
    options: dict[str, Any] = {"num_workers": processes, "collate_fn": collate, "pin_memory": device.type == "cuda"}
    if processes:
        options.update(persistent_workers=persistent, prefetch_factor=PREFETCH, worker_init_fn=_one_thread)
    return options


def build_loaders(data: Mapping[str, str], exp: ExperimentConfig, cfg: TrainConfig, rank: int, world: int,
                  device: torch.device | str = "cpu") -> Loaders:
    """The train loader (a DistributedSampler, grouped batches when ``cfg.aspect_grouping``) and
    this rank's validation shard (no padding: every image is evaluated once).

    ``data``: absolute ``train_ann``, ``train_images``, ``val_ann``, ``val_images``.
    """
    device = torch.device(device)
    train_set = CocoDetection(data["train_ann"], data["train_images"], max_images=exp.data.max_train_images, hflip=cfg.hflip)
    val_set = CocoDetection(data["val_ann"], data["val_images"], max_images=exp.data.max_val_images)
    processes = loader_processes(cfg)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    if cfg.aspect_grouping:
        batches = GroupedBatchSampler(sampler, aspect_ratio_groups(train_set.aspect_ratios(), cfg.aspect_grouping), cfg.batch_size)
        train = DataLoader(train_set, batch_sampler=batches, **_options(processes, device, persistent=True))
    else:
        train = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                           **_options(processes, device, persistent=True))
    shard = Subset(val_set, list(range(rank, len(val_set), world)))
    val = DataLoader(shard, batch_size=cfg.eval_batch_size, shuffle=False, **_options(processes, device, persistent=False))
    return Loaders(train, val, sampler, val_set)


def steps_per_epoch(images: int, cfg: TrainConfig) -> int:
    """Training steps of an epoch over ``images`` images, as :func:`build_loaders` batches them:
    the DistributedSampler's ``drop_last`` share of each of ``num_workers`` ranks,
    ``images // num_workers``, in whole batches of ``batch_size`` (grouped batching keeps that
    count, :class:`~kdsweep.data.batching.GroupedBatchSampler`). 0 when ``images`` is below
    ``batch_size * num_workers``."""
    return images // cfg.num_workers // cfg.batch_size


def check_steps(trials: Sequence[tuple[str, ExperimentConfig]], images: int, train_ann: str | Path) -> None:
    """Raise a one-line :class:`DataError` for the first trial (or its teacher's run, for a row that
    distils) whose epoch over the ``images`` training images of ``train_ann`` (at most
    ``data.max_train_images``) would have no step: such a run would end without a loss to report.

    ``trials``: ``[(row label, config), ...]``, every configuration of the launch
    (:func:`~kdsweep.orchestrate.trials.variants`)."""
    for label, exp in trials:
        limit = exp.data.max_train_images
        used = images if limit is None else min(images, limit)
        for name, cfg in (("train", exp.train), ("teacher_train", exp.teacher_train))[: 2 if exp.kd else 1]:
            if steps_per_epoch(used, cfg) == 0:
                need = cfg.batch_size * cfg.num_workers
                limited = f" (data.max_train_images {limit})" if limit is not None and limit < images else ""
                more = "raise data.max_train_images" if limited else f"train on at least {need} images"
                raise DataError(
                    f"{train_ann}: row '{label}': {used} training image(s){limited} are fewer than one step's "
                    f"{name}.batch_size {cfg.batch_size} x {name}.num_workers {cfg.num_workers} = {need}, so an epoch "
                    f"would have no step; lower {name}.batch_size or {name}.num_workers (--num-workers), or {more}")
