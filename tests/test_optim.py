"""kdsweep.train.optim: the frozen backbone's span computes no gradient for the body, trains exactly
as dropping the body's gradients did, and keeps DDP's workers in step across the freeze and thaw."""

from __future__ import annotations

import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from kdsweep.config import ExperimentConfig, ModelConfig, TrainConfig
from kdsweep.train.distiller import Distiller, build_distiller
from kdsweep.train.engine import train_one_epoch
from kdsweep.train.optim import Optimization, build_optimization

K = 3
CPU = torch.device("cpu")


def student() -> Distiller:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", fpn_channels=8, min_size=64, max_size=64, anchor_scale=2.0)
    return build_distiller(ExperimentConfig(student=cfg), K, None)


def batch(seed: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 44.0]]), "labels": torch.tensor([1 + seed % K])} for _ in range(2)]
    return images, targets


def optimization(distiller: Distiller, freeze: float, steps: int) -> Optimization:
    cfg = TrainConfig(lr=0.01, epochs=1, warmup_iters=0, lr_schedule="constant", grad_clip=None, freeze_backbone=freeze)
    return build_optimization(distiller.trainable, distiller.student, cfg, CPU, steps_per_epoch=steps)


def body(distiller: Distiller) -> list[Tensor]:
    return [p for p in distiller.student.backbone.body.parameters()]


def test_a_frozen_body_gets_no_gradient_and_trains_exactly_as_dropping_its_gradients() -> None:
    steps, loader = 4, [batch(i) for i in range(4)]
    new, old = student(), student()
    opt_new, opt_old = optimization(new, 0.5, steps), optimization(old, 0.5, steps)
    opt_old.begin = lambda progress: None  # the old way: gradients computed, then dropped in step()
    first = body(new)[0]
    computed: list[int] = []
    first.register_hook(lambda grad: computed.append(1))
    frozen_at = [p.detach().clone() for p in body(new)]
    train_one_epoch(new, opt_new, loader[:2], device=CPU, epoch=1, total_steps=steps)
    assert computed == []  # progress 0 and 0.25: no backward through the body at all
    assert all(torch.equal(a, b) for a, b in zip(frozen_at, body(new)))
    assert not first.requires_grad
    train_one_epoch(new, opt_new, loader[2:], device=CPU, epoch=1, step_offset=2, total_steps=steps)
    assert len(computed) == 2 and all(p.requires_grad for p in body(new))  # thawed at progress 0.5
    train_one_epoch(old, opt_old, loader, device=CPU, epoch=1, total_steps=steps)
    for a, b in zip(new.trainable.parameters(), old.trainable.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(frozen_at, body(new)))  # the body did train after


def test_torchvisions_own_frozen_stages_stay_frozen_when_the_span_ends() -> None:
    distiller = student()
    stem = distiller.student.backbone.body.conv1.weight
    stem.requires_grad_(False)  # as trainable_backbone_layers freezes the early stages
    opt = optimization(distiller, 0.5, 2)
    assert all(p is not stem for p in opt.frozen)
    opt.begin(0.0)
    opt.begin(0.5)
    assert stem.requires_grad is False


# --------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, rewrap: bool, queue) -> None:
    torch.set_num_threads(1)
    out: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        distiller = student()
        distiller.wrap(DistributedDataParallel)
        steps = 4
        opt = optimization(distiller, 0.5, steps)
        if rewrap:
            opt.rewrap = lambda: distiller.rewrap(DistributedDataParallel)
        start = [p.detach().clone() for p in body(distiller)]
        loader = [batch(10 * rank + i) for i in range(steps)]  # each rank its own images
        train_one_epoch(distiller, opt, loader[:2], device=CPU, epoch=1, total_steps=steps)
        out["body_still"] = all(torch.equal(a, b) for a, b in zip(start, body(distiller)))
        train_one_epoch(distiller, opt, loader[2:], device=CPU, epoch=1, step_offset=2, total_steps=steps)
        out["body_moved"] = not all(torch.equal(a, b) for a, b in zip(start, body(distiller)))
        flat = torch.cat([p.detach().reshape(-1) for p in distiller.trainable.parameters()])
        every = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(every, flat)
        out["same_on_every_rank"] = all(torch.equal(every[0], f) for f in every)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out["error"] = f"{type(exc).__name__}: {exc}"[:400]
        out["trace"] = traceback.format_exc()[-1500:]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    queue.put((rank, out))


def _run_ddp(rewrap: bool) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, 2, port, rewrap, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return [results[r] for r in range(2)]


def test_ddp_workers_stay_identical_across_the_freeze_and_the_thaw() -> None:
    """Two gloo workers on different images: the body is still while frozen, trains after the
    thaw with averaged gradients (identical parameters on both ranks). Without re-wrapping, DDP
    (whose buckets still hold the body) fails at the first step after the freeze began."""
    ranks = _run_ddp(rewrap=True)
    for out in ranks:
        assert "error" not in out, out.get("trace")
        assert out["body_still"] and out["body_moved"] and out["same_on_every_rank"]
    control = _run_ddp(rewrap=False)
    assert all("Expected to have finished reduction" in out.get("error", "") for out in control), control


def test_tf32_is_off_unless_asked_for_and_both_flags_follow_it() -> None:
    """``train.tf32`` false keeps float32 matmuls and cuDNN convolutions strict (PyTorch's own
    default leaves cuDNN's TF32 on: the float32 KD terms' convolutions would silently be TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        from kdsweep.train.optim import float32_settings

        torch.backends.cudnn.allow_tf32 = True
        assert float32_settings(TrainConfig()) == {"matmul": False, "cudnn": False}
        assert float32_settings(TrainConfig(tf32=True)) == {"matmul": True, "cudnn": True}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_speed_options_are_in_the_run_hash_but_leave_earlier_hashes_alone() -> None:
    from kdsweep.config import config_hash, run_hash_dict

    base = TrainConfig()
    assert "tf32" not in run_hash_dict(base) and "channels_last" not in run_hash_dict(base)
    hashes = {config_hash(run_hash_dict(c)) for c in (base, TrainConfig(tf32=True), TrainConfig(channels_last=True))}
    assert len(hashes) == 3


def test_channels_last_backbones_compute_the_same_losses() -> None:
    plain, fast = student(), student()
    assert fast.channels_last() == sum(p.dim() == 4 for p in fast.student.backbone.parameters()) > 0
    assert fast.student.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images, targets = batch(0)
    torch.manual_seed(1)
    a = plain(images, targets)
    torch.manual_seed(1)
    b = fast(images, targets)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key
