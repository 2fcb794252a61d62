"""Every ``torch.distributed`` call of a training worker, on tensors of the training device.

NCCL, the backend Ray Train picks on GPUs (``TorchConfig(backend=None)``), maps only the ``cuda``
device type: a collective on a CPU tensor raises "No backend type associated with device type
cpu". So nothing here copies a tensor to the host before a collective, and nothing uses the
pickling object collectives (``all_gather_object`` and friends): values are packed into tensors
on ``device``, reduced or gathered there, and read on the host once, after the collective.

Without an initialised process group of more than one rank every function is the identity (one
worker, or a unit test).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_true",
    "broadcast_values",
    "count_distinct",
    "gather_rows",
    "gathers_on",
    "is_distributed",
    "mean_over_workers",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This worker's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of workers (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def all_true(flag: Tensor) -> bool:
    """Whether ``flag`` (a boolean or 0/1 tensor of any shape, on the training device) holds on
    every element of every worker: one MIN all-reduce of an int32 scalar on ``flag``'s device,
    then one host read. Every worker gets the same answer, so all of them stop at the same step.
    """
    ok = flag.detach().to(torch.int32).min().reshape(1)
    if is_distributed():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def mean_over_workers(values: Tensor) -> Tensor:
    """Element-wise mean of ``values`` (a float tensor on the training device) over the workers:
    one SUM all-reduce, then a division. Returns a new tensor; ``values`` is left as it is."""
    out = values.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


GATHER_BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
"""Device type -> the backend whose ``dist.gather`` takes tensors of that type, as PyTorch's
backend table lists it (NCCL: CUDA tensors; gloo: host tensors only). Any other pair (gloo with
CUDA tensors, MPI, UCC, ...) falls back to an all-gather, which both NCCL and gloo run on CUDA."""


def gathers_on(device: torch.device) -> bool:
    """Whether the default process group can ``dist.gather`` tensors on ``device``: the backend it
    maps to ``device.type`` (``dist.get_backend_config()``, e.g. ``"cuda:nccl"`` or
    ``"cpu:gloo,cuda:gloo"``) is the one in :data:`GATHER_BACKENDS`. False without a process group."""
    if not is_distributed():
        return False
    pairs = dict(pair.split(":", 1) for pair in dist.get_backend_config().lower().split(",") if ":" in pair)
    return device.type in GATHER_BACKENDS and pairs.get(device.type) == GATHER_BACKENDS[device.type]


def gather_rows(rows: Tensor, dst: int = 0) -> Tensor | None:
    """Concatenate every worker's ``rows`` (``(n_r, D)``, any ``n_r >= 0``, same ``D`` and dtype,
    on the training device) on worker ``dst``, in rank order; other workers get None.

    Two collectives on the device, nothing pickled:

    1. the row counts: an all-gather of one int64 per worker (every worker needs the largest
       count to pad to it, and ``dst`` needs each count to cut the padding off);
    2. the rows, padded to the largest count: a ``dist.gather`` to ``dst`` where the backend
       gathers tensors of that device (NCCL for CUDA tensors, gloo for host tensors; see
       :func:`gathers_on`), so only ``dst`` receives and holds ``world`` buckets. Otherwise
       (e.g. gloo with CUDA tensors) an all-gather, after which the workers other than ``dst``
       drop what they received.

    When every count is 0 the second collective is skipped (on every worker alike).

    Shape:
        - rows: ``(n_r, D)``; output on ``dst``: ``(sum_r n_r, D)``, rank 0's rows first.
    """
    if rows.dim() != 2:
        raise ValueError(f"gather_rows: expected a (n, D) tensor, got shape {tuple(rows.shape)}")
    if not is_distributed():
        return rows
    world, me = dist.get_world_size(), dist.get_rank()
    if not 0 <= dst < world:
        raise ValueError(f"gather_rows: dst {dst} is not a rank of this process group (0..{world - 1})")
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = torch.cat(counts).tolist()  # one host read of `world` scalars
    longest = max(sizes)
    if longest == 0:
        return rows.new_zeros((0, rows.shape[1])) if me == dst else None
    padded = rows.new_zeros((longest, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    if gathers_on(rows.device):
        buckets = [torch.empty_like(padded) for _ in range(world)] if me == dst else None
        dist.gather(padded, gather_list=buckets, dst=dst)
    else:
        buckets = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(buckets, padded)
    if me != dst:
        return None
    return torch.cat([bucket[:n] for bucket, n in zip(buckets, sizes)])


def broadcast_values(values: Tensor, src: int = 0) -> Tensor:
    """``values`` of worker ``src`` on every worker (a tensor of the same shape and dtype on each
    worker's training device; in place)."""
    if is_distributed():
        dist.broadcast(values, src=src)
    return values


def _id_code(name: str) -> int:
    """A 63-bit integer code of a string (SHA-1 prefix): equal strings, equal codes."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") >> 1


def count_distinct(name: str, device: torch.device | str) -> int:
    """Number of distinct ``name`` strings among the workers (e.g. the Ray node ids of a run's
    workers): each worker all-gathers a 63-bit code of its string as an int64 on ``device``."""
    if not is_distributed():
        return 1
    code = torch.tensor([_id_code(name)], dtype=torch.int64, device=device)
    codes = [torch.empty_like(code) for _ in range(dist.get_world_size())]
    dist.all_gather(codes, code)
    return len(set(torch.cat(codes).tolist()))


def stack_scalars(values: Sequence[Tensor]) -> Tensor:
    """0-d tensors (e.g. loss terms) as one detached float32 vector on their device (no host read)."""
    return torch.stack([v.detach().float().reshape(()) for v in values])
