"""Collectives on the training device (kdsweep.train.collectives) and the checking mode that makes a
CPU run fail where NCCL would (kdsweep.train.collective_check).

NCCL maps only the ``cuda`` device type; ``init_process_group("cuda:gloo")`` gives a CPU process
group the same device map, which is how the first test reproduces the GPU failure of a host copy.
On the CPU the training device is the host, so the other tests track host provenance instead
(:mod:`kdsweep.train.collective_check`) and run the worker's distributed code on two real gloo ranks.
"""

from __future__ import annotations

import math
import socket
import traceback

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdsweep.train import collectives
from kdsweep.train.collective_check import CollectiveDeviceError, guard, is_host


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _legacy_check_finite(total: torch.Tensor) -> bool:
    """``engine.check_finite`` before the fix: the flag went to the host, then to the all-reduce."""
    ok = torch.isfinite(total.detach()).to(torch.int32).reshape(1).cpu()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _spawn(fn, backend: str, world: int = 2, *args) -> list[dict]:
    """Run ``fn(rank, world, *args) -> dict`` on ``world`` processes in one process group;
    return each rank's dict (an exception becomes ``{"error": type, "message": ...}``)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world, port, backend, queue, args)) for rank in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, out = queue.get(timeout=240)
        results[rank] = out
    for p in procs:
        p.join(timeout=60)
    return [results[r] for r in range(world)]


def _entry(fn, rank, world, port, backend, queue, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = fn(rank, world, *args)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out = {"error": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()}
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    queue.put((rank, out))


# ----------------------------------------------------------------------- the NCCL device map
def _cuda_only_map(rank: int, world: int) -> dict:
    out = {}
    try:
        _legacy_check_finite(torch.tensor(1.0))
        out["legacy"] = "passed"
    except RuntimeError as exc:
        out["legacy"] = str(exc)
    with guard():
        try:
            _legacy_check_finite(torch.tensor(1.0))
            out["guarded"] = "passed"
        except CollectiveDeviceError as exc:
            out["guarded"] = str(exc)
    return out


def test_a_cuda_only_backend_map_rejects_the_host_copy_and_the_guard_names_it():
    """What NCCL does to the old ``check_finite`` (reproduced with a cuda-only device map), and
    that the checking mode stops the same code before the collective, with a reason."""
    for out in _spawn(_cuda_only_map, "cuda:gloo"):
        assert "error" not in out, out.get("trace")
        assert "No backend type associated with device type cpu" in out["legacy"]
        assert out["guarded"].startswith("torch.distributed.all_reduce got a host tensor")


# --------------------------------------------------------------------------- the guard alone
def test_guard_marks_host_copies_and_factories_without_device(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(t))
    device = torch.device("cpu")  # "the training device" (a torch.device object)
    on_device = torch.ones(2, device=device)
    with guard() as seen:
        assert is_host(on_device.cpu())
        assert is_host(on_device.to("cpu"))
        assert is_host(torch.tensor([1.0]))
        assert is_host(torch.zeros(3))
        assert not is_host(torch.zeros(3, device=device))
        assert not is_host(on_device.cpu().to(device))  # back on the training device
        assert is_host(torch.tensor(2.0) + torch.tensor(1.0))  # host op host: host
        assert not is_host(on_device * torch.tensor(2.0))  # like a CUDA op with a 0-d CPU scalar
        assert is_host(torch.isfinite(on_device.cpu()).to(torch.int32).min().reshape(1))  # propagates
        dist.all_reduce(torch.ones(1, device=device) * 2)
        with pytest.raises(CollectiveDeviceError, match="all_reduce got a host tensor"):
            dist.all_reduce(on_device.cpu())
        with pytest.raises(CollectiveDeviceError, match="object collectives"):
            dist.all_gather_object([None, None], {"a": 1})
    assert len(calls) == 1 and seen == {"all_reduce": 1}
    assert dist.all_reduce is not None and not is_host(torch.tensor(1.0))  # restored afterwards


# ---------------------------------------------------------------- the worker's code, two ranks
class _BoxPerImage(torch.nn.Module):
    """Eval-mode 'detector': one box (0, 0, 4, 4), label 1, score 0.9 per image."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images, targets=None, progress=0.0):
        if self.training:
            goal = torch.stack([t["boxes"].mean() for t in targets]).mean()
            return {"mse": (self.w - goal) ** 2, "other": self.w * 0.0 + float(dist.get_rank())}
        d = images[0].device
        return [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]], device=d), "scores": torch.full((1,), 0.9, device=d),
                 "labels": torch.ones(1, dtype=torch.int64, device=d)} for _ in images]


def _gt(n_images: int):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 8, "height": 8, "file_name": f"{i}.jpg"} for i in range(1, n_images + 1)],
        "annotations": [{"id": i, "image_id": i, "category_id": 5, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0}
                        for i in range(1, n_images + 1)],
        "categories": [{"id": 5, "name": "a"}],
    }
    coco.createIndex()
    return coco


def _worker_paths(rank: int, world: int) -> dict:
    from kdsweep.train.engine import NonFiniteLossError, check_finite, evaluate, train_one_epoch
    from kdsweep.train.optim import Optimization

    device = torch.device("cpu")
    out: dict = {}
    with guard() as seen:
        # the old check_finite is caught, the new one passes
        try:
            _legacy_check_finite(torch.tensor(1.0, device=device))
            out["legacy"] = "passed"
        except CollectiveDeviceError as exc:
            out["legacy"] = str(exc)
        check_finite(torch.tensor(1.0, device=device), {}, epoch=1, step=0)
        bad = torch.tensor(float("nan") if rank == 1 else 1.0, device=device)
        try:
            check_finite(bad, {"x": bad}, epoch=1, step=3)
            out["nan"] = "passed"
        except NonFiniteLossError:
            out["nan"] = "raised"  # on every rank, not only the one with the NaN
        # loss means over the workers
        model = _BoxPerImage()
        loader = [([torch.zeros(3, 8, 8)], [{"boxes": torch.full((1, 4), 2.0 + rank)}])] * 3
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        optimization = Optimization(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0), list(model.parameters()))
        metrics = train_one_epoch(model, optimization, loader, device=device, epoch=1)
        out["loss/other"] = metrics["loss/other"]
        out["loss/mse"] = metrics["loss/mse"]
        # sharded evaluation: rank 0 gets images 1, 3, 5; rank 1 gets 2, 4
        ids = [i for i in range(1, 6) if (i - 1) % world == rank]
        val = [([torch.zeros(3, 8, 8)], [{"image_id": torch.tensor(i)}]) for i in ids]
        out["eval"] = evaluate(model, val, device=device, coco_gt=_gt(5), label_to_cat_id={1: 5}, image_ids=list(range(1, 6)))
        # a worker with nothing to evaluate
        out["eval_empty"] = evaluate(model, val if rank == 0 else [], device=device, coco_gt=_gt(5),
                                     label_to_cat_id={1: 5}, image_ids=list(range(1, 6)))
        out["nodes_same"] = collectives.count_distinct("node-a", device)
        out["nodes_each"] = collectives.count_distinct(f"node-{rank}", device)
        rows = torch.arange(3.0 * rank, device=device).reshape(rank, 3) if rank else torch.zeros((0, 3), device=device)
        gathered = collectives.gather_rows(rows, dst=0)
        out["gathered"] = None if gathered is None else gathered.tolist()
    out["seen"] = dict(seen)
    return out


def test_worker_collectives_run_on_two_ranks_under_the_guard():
    results = _spawn(_worker_paths, "gloo")
    for rank, out in enumerate(results):
        assert "error" not in out, out.get("trace")
        assert out["legacy"].startswith("torch.distributed.all_reduce got a host tensor")
        assert out["nan"] == "raised"
        assert out["loss/other"] == pytest.approx(0.5)  # rank 0 logs 0, rank 1 logs 1: the mean
        assert out["loss/mse"] == pytest.approx((4.0 + 9.0) / 2)  # (0 - 2)^2 and (0 - 3)^2
        assert out["eval"]["eval_images"] == 5 and out["eval"]["AP"] == pytest.approx(100.0)
        assert out["eval_empty"]["eval_images"] == 3 and math.isfinite(out["eval_empty"]["AP"])
        assert out["nodes_same"] == 1 and out["nodes_each"] == 2
        assert {"all_reduce", "all_gather", "broadcast"} <= set(out["seen"])
    assert results[0]["gathered"] == [[0.0, 1.0, 2.0]] and results[1]["gathered"] is None
    # the same numbers on both ranks (NaN where an area range has no ground truth: medium, large)
    assert pd.Series(results[0]["eval"]).equals(pd.Series(results[1]["eval"]))
    assert math.isnan(results[0]["eval"]["AP_L"])


# ------------------------------------------------------- gather_rows: rows reach dst only
GATHER_COUNTS = (2, 0, 3)  # rows per rank, uneven, one rank with none
GATHER_DST = 1  # not rank 0, so "dst" is not confused with "the first rank"


def _rank_rows(rank: int, n: int, device: torch.device) -> torch.Tensor:
    """``(n, 7)`` float64 rows whose every value names its rank and row: ``100 * rank + row``."""
    ids = torch.arange(n, dtype=torch.float64, device=device) + 100.0 * rank
    return ids.reshape(n, 1).expand(n, 7).contiguous()


def _gather_paths(rank: int, world: int) -> dict:
    device = torch.device("cpu")
    out: dict = {}
    rows = _rank_rows(rank, GATHER_COUNTS[rank], device)
    for path in ("gather", "all_gather fallback"):
        forced = {"all_gather fallback": lambda _device: False}.get(path)
        native = collectives.gathers_on
        if forced is not None:
            collectives.gathers_on = forced  # this process only: as gloo does with CUDA tensors
        try:
            with guard() as seen:
                got = collectives.gather_rows(rows, dst=GATHER_DST)
                empty = collectives.gather_rows(rows[:0], dst=GATHER_DST)
        finally:
            collectives.gathers_on = native
        out[path] = {"rows": None if got is None else got.tolist(), "dtype": None if got is None else str(got.dtype),
                     "empty": None if empty is None else list(empty.shape), "seen": dict(seen)}
    out["gathers_on"] = collectives.gathers_on(device)
    try:  # checked before any collective, so every rank raises and none hangs
        collectives.gather_rows(rows, dst=world)
        out["bad_dst"] = "no error"
    except ValueError as exc:
        out["bad_dst"] = str(exc)
    return out


def test_gather_rows_lands_on_dst_only_in_rank_order_with_uneven_counts():
    """Three gloo ranks with 2, 0 and 3 rows gather to rank 1: host tensors on gloo take the
    ``dist.gather`` path (one all-gather of the counts, one gather of the rows), the forced
    fallback the all-gather path; both give dst the rows in rank order and the others None,
    under the guard (no host copies, no pickling). All counts 0: dst gets ``(0, 7)``, and no
    rows collective runs. A dst outside the group is refused before any collective."""
    results = _spawn(_gather_paths, "gloo", len(GATHER_COUNTS))
    expected = [_rank_rows(r, n, torch.device("cpu")).tolist() for r, n in enumerate(GATHER_COUNTS)]
    expected = [row for rows in expected for row in rows]
    assert [row[0] for row in expected] == [0.0, 1.0, 200.0, 201.0, 202.0]
    for rank, out in enumerate(results):
        assert "error" not in out, out.get("trace")
        assert out["gathers_on"] is True  # gloo gathers host tensors
        gather, fallback = out["gather"], out["all_gather fallback"]
        if rank == GATHER_DST:
            for path in (gather, fallback):
                assert path["rows"] == expected and path["dtype"] == "torch.float64"
                assert path["empty"] == [0, 7]
        else:
            for path in (gather, fallback):
                assert path["rows"] is None and path["empty"] is None
        # counts: one all-gather per call (2 calls); rows: one gather (1 call: the empty one skips it)
        assert gather["seen"] == {"all_gather": 2, "gather": 1}
        assert fallback["seen"] == {"all_gather": 3}
        assert "dst 3 is not a rank of this process group (0..2)" in out["bad_dst"]


def test_single_process_collectives_are_identities():
    x = torch.tensor([1.0, 2.0])
    assert collectives.world_size() == 1 and collectives.rank() == 0
    assert collectives.all_true(torch.tensor(True)) and not collectives.all_true(torch.tensor([1, 0]))
    assert torch.equal(collectives.mean_over_workers(x), x)
    assert collectives.gather_rows(x.reshape(1, 2)) is not None
    assert not collectives.gathers_on(torch.device("cpu"))  # no process group: nothing to gather with
    assert collectives.count_distinct("a", "cpu") == 1
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        collectives.gather_rows(x)



def test_the_guard_restores_the_very_functions_it_replaced_on_exit_and_on_exception(monkeypatch):
    """Every ``torch.distributed`` function the guard wraps is, after the block, the object that was
    there before it (identity, not merely "something callable"), whether the block ends normally
    or by an exception; a host tensor then reaches the original all_reduce unchecked."""
    from kdsweep.train.collective_check import OBJECT_COLLECTIVES, TENSOR_COLLECTIVES

    calls = []

    def original_all_reduce(t, *a, **k):
        calls.append(t)

    monkeypatch.setattr(dist, "all_reduce", original_all_reduce)
    names = [n for n in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES if hasattr(dist, n)]
    before = {n: getattr(dist, n) for n in names}
    assert "all_reduce" in names and "all_gather_object" in names
    with guard():
        assert dist.all_reduce is not original_all_reduce  # wrapped inside the block
        assert all(getattr(dist, n) is not before[n] for n in names)
    assert dist.all_reduce is original_all_reduce
    assert {n for n in names if getattr(dist, n) is not before[n]} == set()
    with pytest.raises(KeyError, match="inside the block"):
        with guard():
            raise KeyError("inside the block")
    assert dist.all_reduce is original_all_reduce
    assert {n for n in names if getattr(dist, n) is not before[n]} == set()
    host = torch.ones(1).cpu()
    dist.all_reduce(host)  # the original: no check, no CollectiveDeviceError
    assert len(calls) == 1 and calls[0] is host
