"""How trials share a cluster: how many run at once, where a trial's workers go, and the learning
rate when the number of workers changes the global batch.

Each rule is a pure function of the configs and of the cluster's resources as Ray reports them
(``ray.cluster_resources()``, ``ray.nodes()``), so it is tested without a cluster; the launchers
and the Tune trial driver call them with the live figures.

* **Concurrency** (:func:`max_concurrent`): ``auto`` runs as many trials at once as the cluster
  holds, the cluster's GPUs divided by the GPUs one trial takes (its workers), or its CPUs divided
  by a trial's CPUs for CPU runs. It is the default of the GPU presets.
* **Placement** (:func:`placement`): ``auto`` packs a trial's workers onto one node
  (``STRICT_PACK``) when one node holds them all with a CPU to spare for the Tune drivers, so that
  NCCL's all-reduce stays inside the node (NVLink/PCIe rather than the network); otherwise
  ``PACK`` (as few nodes as Ray can). A run whose workers Ray cannot start within
  :data:`PLACEMENT_WAIT_S` ends its trial with a one-line reason (:func:`start_retries`), and a
  cluster too small for a run is said at launch (:func:`fits`).
* **Linear scaling rule** (:func:`scale_lr`; Goyal et al. 2017, "Accurate, Large Minibatch SGD",
  §2.1: "when the minibatch size is multiplied by k, multiply the learning rate by k"): when
  ``--num-workers`` changes a run's global batch (workers x batch per worker), its learning rate
  follows: ``lr = base_lr * global_batch / base_global_batch``. The base is the preset's (and the
  row's) own setting: the ``paper`` presets give 8 workers x 2 images = 16 at lr 0.01, mmdetection's
  RetinaNet 1x. Warm-up iterations are left as they are, and a learning rate that a search
  samples (``space: {train.lr: ...}``) is taken as sampled.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from kdsweep.config import ConfigError, ExperimentConfig, TrainConfig

__all__ = ["AUTO", "DRIVERS_CPU", "PLACEMENT_WAIT_S", "fits", "max_concurrent", "parse_concurrency", "placement",
           "scale_lr", "start_retries", "trial_resources"]

AUTO = "auto"


def parse_concurrency(value: str | int | None, where: str = "--max-concurrent") -> int | str | None:
    """``auto`` or an integer >= 1 (None: not given)."""
    if value is None or value == AUTO:
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} '{value}' is not a number; use an integer >= 1 or auto") from None
    if number < 1:
        raise ConfigError(f"{where} {number} must be >= 1 (or auto)")
    return number


def trial_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one trial of ``cfg`` asks of the cluster: its workers' CPUs and GPUs together."""
    out = {"CPU": cfg.num_workers * cfg.cpus_per_worker}
    if cfg.use_gpu:
        out["GPU"] = float(cfg.num_workers)
    return out


def max_concurrent(value: int | str, configs: Iterable[TrainConfig], cluster: Mapping[str, float]) -> tuple[int, str]:
    """Trials at once: ``value`` itself when it is a number; for ``auto``, the number of the
    largest trial among ``configs`` that ``cluster`` (``ray.cluster_resources()``) holds at once,
    at least 1. Returns ``(count, one line saying how it was chosen)``.

    GPU trials are counted by GPUs (a GPU node's CPUs are sized for its GPUs), CPU trials by CPUs.
    """
    if value != AUTO:
        return int(value), f"{value} trial(s) at once"
    cfgs = list(configs)
    if any(c.use_gpu for c in cfgs):
        per_trial = max(trial_resources(c).get("GPU", 0.0) for c in cfgs)
        have = float(cluster.get("GPU", 0.0))
        count = max(1, int(have // per_trial)) if per_trial else 1
        why = (f"{have:g} GPU(s) in the cluster, {per_trial:g} per trial" if have else
               "no GPU in the cluster yet (autoscaling?), so 1")
        return count, f"--max-concurrent auto: {count} trial(s) at once ({why})"
    per_trial = max(trial_resources(c)["CPU"] for c in cfgs) if cfgs else 1.0
    have = float(cluster.get("CPU", 0.0))
    count = max(1, int(have // per_trial)) if per_trial else 1
    return count, f"--max-concurrent auto: {count} trial(s) at once ({have:g} CPU(s) in the cluster, {per_trial:g} per trial)"


DRIVERS_CPU = 1.0
"""CPUs kept free on a node beside a run's workers for ``auto`` to pick ``STRICT_PACK`` there: the
Tune trial drivers (0.05 CPU each, :data:`kdsweep.orchestrate.runner.DRIVER_CPU`) and anything
else that holds a fraction of a CPU. Without it, an 8-GPU node whose CPUs the 8 workers take
exactly can never hold them all while one driver sits on it: ``STRICT_PACK`` would wait forever."""


def placement(cfg: TrainConfig, nodes: Iterable[Mapping[str, float]]) -> str:
    """Ray Train's placement strategy for one run of ``cfg``: the configured one, or for ``auto``
    ``STRICT_PACK`` when one of ``nodes`` (each alive node's total resources, ``ray.nodes()[i]
    ["Resources"]``) holds every worker with :data:`DRIVERS_CPU` to spare, else ``PACK``."""
    if cfg.placement_strategy != AUTO:
        return cfg.placement_strategy
    need = trial_resources(cfg)
    need["CPU"] += DRIVERS_CPU
    for node in nodes:
        if all(float(node.get(key, 0.0)) >= amount for key, amount in need.items()):
            return "STRICT_PACK"
    return "PACK"


PLACEMENT_WAIT_S = 600.0
"""How long a run waits for its workers' resources before its trial ends with a one-line reason
(``KDSWEEP_PLACEMENT_WAIT_S`` overrides it): Ray Train tries to start the worker group for
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s by default) and, left alone, tries again forever."""


def start_retries() -> tuple[int, float]:
    """``(controller_failure_limit, seconds waited in all)`` for Ray Train's ``FailureConfig``:
    enough start attempts of ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` each to wait
    :data:`PLACEMENT_WAIT_S` (an autoscaler adding a node in that time is waited for)."""
    wait = float(os.environ.get("KDSWEEP_PLACEMENT_WAIT_S", PLACEMENT_WAIT_S))
    attempt = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    attempts = max(1, math.ceil(wait / attempt))
    return attempts - 1, attempts * attempt


def fits(cfgs: Iterable[TrainConfig], cluster: Mapping[str, float]) -> str | None:
    """None when the cluster's resources (``ray.cluster_resources()``) hold the largest of
    ``cfgs``'s runs and a trial driver; else the one line that says what is missing."""
    for cfg in cfgs:
        need = trial_resources(cfg)
        need["CPU"] += 0.05
        short = {k: v for k, v in need.items() if float(cluster.get(k, 0.0)) < v}
        if short:
            have = ", ".join(f"{float(cluster.get(k, 0.0)):g} {k}" for k in short)
            want = ", ".join(f"{v:g} {k}" for k, v in short.items())
            return (f"a run of {cfg.num_workers} worker(s) x {cfg.cpus_per_worker:g} CPU"
                    f"{' + 1 GPU' if cfg.use_gpu else ''} needs {want} with its trial driver, and the cluster has {have}")
    return None


def scale_lr(exp: ExperimentConfig, base: ExperimentConfig) -> tuple[ExperimentConfig, list[str]]:
    """``exp`` with the linear scaling rule applied to ``train`` and ``teacher_train`` against
    ``base`` (the same row before ``--num-workers``): ``lr * global_batch / base_global_batch``.
    Returns the config and one line per section whose learning rate changed."""
    changes: dict[str, Any] = {}
    notes = []
    for section in ("train", "teacher_train"):
        cfg: TrainConfig = getattr(exp, section)
        ref: TrainConfig = getattr(base, section)
        global_batch, base_batch = cfg.num_workers * cfg.batch_size, ref.num_workers * ref.batch_size
        if global_batch == base_batch:
            continue
        lr = ref.lr * global_batch / base_batch
        changes[section] = dataclasses.replace(cfg, lr=lr)
        notes.append(f"{section}: global batch {base_batch} -> {global_batch} "
                     f"({cfg.num_workers} worker(s) x {cfg.batch_size}), lr {ref.lr:g} -> {lr:g} (linear scaling rule)")
    return (dataclasses.replace(exp, **changes) if changes else exp), notes
