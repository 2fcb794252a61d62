"""Distiller: frozen teacher outside the module tree, weighted KD terms, DDP on the trainable part."""

from __future__ import annotations

import socket
from typing import Sequence

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdsweep.config import ConfigError, ExperimentConfig, KDTermConfig, ModelConfig
from kdsweep.kd.step import KDStep
from kdsweep.kd.term import KDTerm, Need
from kdsweep.models.detectors import build_detector
from kdsweep.models.taps import FeatureTap, align_to
from kdsweep.train.distiller import Distiller, build_distiller, term_names

K = 3
DET_KEYS = {"classification", "bbox_regression"}


class StandInL2(KDTerm):
    """A KD term of the contract: per-level 1x1 adapter, then mean squared error."""

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels))

    def forward(self, step: KDStep) -> Tensor:
        return self.compare(*step.aligned())

    def compare(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        terms = [((a(s) - t) ** 2).mean() for a, s, t in zip(self.adapters, student, teacher)]
        return torch.stack(terms).mean()


def student_cfg() -> ModelConfig:
    return ModelConfig(backbone="resnet18", fpn_channels=16, min_size=64, max_size=64)


def make_teacher() -> nn.Module:
    torch.manual_seed(1)
    return build_detector(ModelConfig(backbone="resnet18", fpn_channels=32, min_size=128, max_size=128), K)


def make_distiller(weight: float = 0.5, levels: Sequence[str] = ("p3", "p4")) -> Distiller:
    torch.manual_seed(0)
    student = build_detector(student_cfg(), K)
    terms = {"l2": (weight, StandInL2(16, 32, len(levels)))}
    return Distiller(student, make_teacher(), terms, levels, teacher_scale=2.0)


def batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([K])},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def test_teacher_frozen_and_outside_module_tree() -> None:
    distiller = make_distiller()
    teacher = distiller.teacher
    distiller.train()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    assert all(key.startswith("trainable.") for key in distiller.state_dict())
    assert teacher not in list(distiller.modules())
    images, targets = batch()
    losses = distiller(images, targets)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_losses_and_gradients() -> None:
    distiller = make_distiller(weight=0.5)
    images, targets = batch()
    losses = distiller(images, targets)
    assert set(losses) == DET_KEYS | {"kd_l2"}
    sum(losses.values()).backward()
    trainable = [p for p in distiller.trainable.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)  # student, heads and adapters (DDP-safe)
    adapter = distiller.trainable.terms["l2"].adapters[0].weight
    assert adapter.grad.abs().sum() > 0
    assert distiller.student.backbone.body.conv1.weight.grad.abs().sum() > 0


def test_kd_entry_is_weight_times_unweighted_term() -> None:
    distiller = make_distiller(weight=0.5)
    images, targets = batch()
    losses = distiller(images, targets)
    inner = distiller.trainable
    with torch.no_grad():
        t_feats = distiller.teacher_features(images)
        with FeatureTap(distiller.student) as tap:
            distiller.student(images, targets)
        s, t = align_to(tap.pop(), t_feats, ["p3", "p4"], teacher_scale=2.0)
        unweighted = inner.terms["l2"].compare(s, t)
    assert s[0].shape[-2:] == t[0].shape[-2:] == (8, 8)
    torch.testing.assert_close(losses["kd_l2"].detach(), 0.5 * unweighted)


def test_no_teacher_mode_equals_plain_student() -> None:
    torch.manual_seed(0)
    student = build_detector(student_cfg(), K)
    distiller = Distiller(student)
    images, targets = batch()
    assert list(distiller.state_dict()) == [f"trainable.student.{k}" for k in student.state_dict()]
    ours = distiller(images, targets)
    plain = student(images, targets)
    assert set(ours) == DET_KEYS
    for key in plain:
        torch.testing.assert_close(ours[key], plain[key])
    distiller.eval()
    with torch.no_grad():
        detections = distiller(images)
    assert isinstance(detections, list) and set(detections[0]) == {"boxes", "scores", "labels"}


def test_to_reaches_teacher_and_levels_are_checked() -> None:
    distiller = make_distiller()
    distiller.to(torch.float64)
    assert next(distiller.teacher.parameters()).dtype == torch.float64
    distiller.to(torch.float32)
    assert next(distiller.teacher.parameters()).dtype == torch.float32
    with pytest.raises(ConfigError, match="p2"):
        make_distiller(levels=("p2",))
    with pytest.raises(ConfigError, match="teacher"):
        Distiller(build_detector(student_cfg(), K), None, {"l2": (1.0, StandInL2(16, 32, 1))})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(worker, world: int = 2, timeout: float = 300) -> dict:
    """Run ``worker(rank, world, port, queue)`` on ``world`` spawned processes; return
    ``{rank: what it put}``. The processes are daemons, and whatever is still alive when this
    returns or raises (a rank hung in gloo, a ``queue.get`` timeout) is terminated, then killed,
    so pytest never waits on them at exit."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, queue), daemon=True) for r in range(world)]
    try:
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=timeout) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def test_ddp_wraps_trainable_only() -> None:
    distiller = make_distiller()
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        distiller.wrap(lambda m: DistributedDataParallel(m))  # find_unused_parameters=False
        assert isinstance(distiller.trainable, DistributedDataParallel)
        student = distiller.student
        assert student is distiller.trainable.module.student
        optimizer = torch.optim.SGD(distiller.trainable.parameters(), lr=0.01)
        images, targets = batch()
        for _ in range(2):  # the 2nd step fails under DDP if a parameter got no gradient
            losses = distiller(images, targets)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        assert "kd_l2" in losses
    finally:
        dist.destroy_process_group()
    assert not distiller.teacher.training
    for key, value in distiller.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert all(k.startswith("trainable.module.") for k in distiller.state_dict())


def test_term_names() -> None:
    kd = [KDTermConfig("l2"), KDTermConfig("ssim"), KDTermConfig("l2")]
    assert term_names(kd) == ["l2_0", "ssim", "l2_1"]


def test_build_distiller_builds_each_entry_with_its_levels_widths_and_weight() -> None:
    cfg = ExperimentConfig(
        student=student_cfg(),
        kd=(KDTermConfig("l2", weight=2.0, levels=("p3",), adapter=True), KDTermConfig("l2", adapter=True),
            KDTermConfig("ssim", weight=0.0, adapter=True)),
        teacher_scale=2.0,
    )
    teacher = make_teacher()
    teacher.transform.min_size, teacher.transform.max_size = (999,), 999
    distiller = build_distiller(cfg, K, teacher)
    assert teacher.transform.min_size == (128,) and teacher.transform.max_size == 128
    inner = distiller.trainable
    all_levels = ("p3", "p4", "p5", "p6", "p7")
    assert inner.levels == {"l2_0": ("p3",), "l2_1": all_levels, "ssim": all_levels}
    assert inner.weights == {"l2_0": 2.0, "l2_1": 1.0, "ssim": 0.0}
    for name, count in (("l2_0", 1), ("l2_1", 5), ("ssim", 5)):  # one 16 -> 32 adapter per level
        assert [tuple(a.weight.shape) for a in inner.terms[name].adapters] == [(32, 16, 1, 1)] * count
    images, targets = batch()
    losses = distiller(images, targets)
    assert set(losses) == DET_KEYS | {"kd_l2_0", "kd_l2_1", "kd_ssim"}
    assert losses["kd_ssim"].item() == 0.0 and losses["kd_l2_1"].item() > 0


def test_build_distiller_errors_and_baseline() -> None:
    with pytest.raises(ConfigError, match="teacher"):
        build_distiller(ExperimentConfig(student=student_cfg(), kd=(KDTermConfig("l2"),)), K, None)
    bad = ExperimentConfig(student=student_cfg(), kd=(KDTermConfig("l2", levels=("p2",)),))
    with pytest.raises(ConfigError, match="kd.l2.levels"):
        build_distiller(bad, K, make_teacher())
    baseline = build_distiller(ExperimentConfig(student=student_cfg()), K, make_teacher())
    assert baseline.teacher is None and not baseline.has_kd and len(baseline.trainable.terms) == 0


class _Seer(KDTerm):
    """Records which parts of the step it was given."""

    def __init__(self, needs: frozenset) -> None:
        super().__init__()
        self.needs = needs
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: dict[str, bool] = {}

    def forward(self, step: KDStep) -> Tensor:
        self.seen = {"targets": step.targets is not None, "head": step.head_outputs is not None,
                     "anchors": step.anchors is not None, "body": step.student_body is not None,
                     "teacher_body": step.teacher_out.body is not None, "teacher_levels": len(step.teacher_feats)}
        return self.w * 0.0


@pytest.mark.parametrize("needs, expected", [
    (frozenset(), {"targets": False, "head": False, "anchors": False, "body": False, "teacher_body": False,
                   "teacher_levels": 2}),
    (frozenset({Need.TARGETS, Need.HEAD, Need.BODY, Need.TEACHER_LEVELS}),
     {"targets": True, "head": True, "anchors": True, "body": True, "teacher_body": True, "teacher_levels": 5}),
])
def test_the_distiller_installs_exactly_the_hooks_the_terms_need(needs, expected) -> None:
    torch.manual_seed(0)
    term = _Seer(needs)
    distiller = Distiller(build_detector(student_cfg(), K), make_teacher(), {"seer": (1.0, term)}, ("p3", "p4"),
                          teacher_scale=2.0)
    distiller(*batch())
    assert term.seen == expected


def test_cross_arch_student_shares_levels_with_teacher() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="fasterrcnn", backbone="mobilenet_v3_small", fpn_channels=16, min_size=64, max_size=64)
    student = build_detector(cfg, K)  # P2..P6; the RetinaNet teacher has P3..P7
    distiller = Distiller(student, make_teacher(), {"l2": (1.0, StandInL2(16, 32, 4))}, teacher_scale=2.0)
    assert distiller.trainable.levels == {"l2": ("p3", "p4", "p5", "p6")}
    images, targets = batch()
    losses = distiller(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "kd_l2"} == set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in distiller.trainable.terms.parameters())


# ---------------------------------------------------------------------- two data-parallel workers
def _two_workers(rank: int, world: int, port: int, queue) -> None:
    """Rank ``rank`` of a 2-process gloo group: one DDP step of a Distiller with a feature term
    (l2 with adapters), a context term (ScaleKD's assistant, its own parameters), FGD (targets,
    its own blocks) and CrossKD (tapped head features through the teacher's head), each rank on
    its own batch; rank 0 also computes the same step of each batch without DDP."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        def build() -> Distiller:
            torch.manual_seed(1)
            teacher = build_detector(ModelConfig(backbone="resnet18", fpn_channels=32, min_size=64, max_size=64,
                                                 anchor_scale=2.0), K)
            torch.manual_seed(0)
            kd = (KDTermConfig("l2", adapter=True),
                  KDTermConfig("csa", params={"num_heads": 2, "ratios": [1, 2], "start": 0.0}),
                  KDTermConfig("fgd", adapter=True),  # reads the targets; trains its global-context blocks
                  KDTermConfig("crosskd", adapter=True))  # taps the student's head, runs the teacher's
            cfg = ExperimentConfig(student=ModelConfig(backbone="resnet18", fpn_channels=16, min_size=64, max_size=64,
                                                       anchor_scale=2.0), kd=kd)
            return build_distiller(cfg, K, teacher)

        def batch_of(r: int):
            g = torch.Generator().manual_seed(10 + r)
            images = [torch.rand(3, 64, 64, generator=g)]
            targets = [{"boxes": torch.tensor([[4.0 + 8 * r, 6.0, 30.0 + 8 * r, 40.0]]), "labels": torch.tensor([1 + r])}]
            return images, targets

        watched = ("terms.l2.adapters.0.weight", "terms.csa.assistant.attention.0.q_proj.weight",
                   "terms.fgd.student_gc.0.transform.3.weight", "terms.crosskd.adapters.classification_head.weight")

        def grads(module) -> dict:
            # numpy arrays travel through the queue by value; a tensor would travel as a file
            # descriptor that the parent must fetch from this process, which may have exited by then
            named = dict(module.named_parameters())
            return {k: named[k].grad.detach().numpy().copy() for k in watched}

        ddp = build()
        ddp.wrap(lambda m: DistributedDataParallel(m))
        losses = ddp(*batch_of(rank))
        sum(losses.values()).backward()
        out = {"ddp": grads(ddp.trainable.module)}
        if rank == 0:
            local = []
            for r in range(world):
                plain = build()
                sum(plain(*batch_of(r)).values()).backward()
                local.append(grads(plain.trainable))
            out["local"] = local
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_two_data_parallel_workers_average_the_kd_terms_gradients() -> None:
    results = _run_ranks(_two_workers)
    results = {rank: {k: ({n: torch.from_numpy(a) for n, a in v.items()} if k == "ddp"
                          else [{n: torch.from_numpy(a) for n, a in g.items()} for g in v])
                      for k, v in out.items()} for rank, out in results.items()}
    for name, value in results[0]["ddp"].items():
        mean = (results[0]["local"][0][name] + results[0]["local"][1][name]) / 2
        assert not torch.allclose(results[0]["local"][0][name], results[0]["local"][1][name])  # the batches differ
        torch.testing.assert_close(value, mean, rtol=1e-4, atol=1e-7)  # DDP's mean of the two workers'
        torch.testing.assert_close(results[1]["ddp"][name], value)  # the same on both workers


# ------------------------------------------------- synchronised BatchNorm of from-scratch students
def _synced_batchnorm_workers(rank: int, world: int, port: int, queue) -> None:
    """Rank ``rank`` of a 2-process gloo group: the worker's own preparation
    (:func:`kdsweep.train.worker.prepare_distiller`, DDP for ``prepare_model``) of a from-scratch
    student (``weights: None``: trainable BatchNorm) with a from-scratch teacher, then one
    training step on this rank's own image, under the collective checker as the tests' Ray runs.
    Also a lone SyncBatchNorm layer against one BatchNorm2d over both ranks' inputs (rank 0)."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        from torch.nn.modules.batchnorm import _BatchNorm

        from kdsweep.train import collective_check
        from kdsweep.train.distiller import HostSyncBatchNorm
        from kdsweep.train.worker import prepare_distiller

        def build() -> Distiller:
            torch.manual_seed(1)
            teacher = build_detector(ModelConfig(backbone="resnet18", fpn_channels=32, min_size=64, max_size=64,
                                                 anchor_scale=2.0), K)
            torch.manual_seed(0)
            cfg = ExperimentConfig(student=ModelConfig(backbone="resnet18", fpn_channels=16, min_size=64, max_size=64,
                                                       anchor_scale=2.0, weights=None),
                                   kd=(KDTermConfig("l2", adapter=True),))
            return build_distiller(cfg, K, teacher)

        def batch_of(r: int):
            g = torch.Generator().manual_seed(10 + r)
            images = [torch.rand(3, 64, 64, generator=g) * (1 + r)]  # rank 1's image is brighter
            targets = [{"boxes": torch.tensor([[4.0 + 8 * r, 6.0, 30.0 + 8 * r, 40.0]]), "labels": torch.tensor([1 + r])}]
            return images, targets

        def stats(student: nn.Module) -> dict:
            return {f"{name}.{buf}": getattr(m, buf).detach().numpy().copy() for name, m in student.named_modules()
                    if isinstance(m, _BatchNorm) for buf in ("running_mean", "running_var")}

        out: dict = {}
        distiller = build()
        teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
        out["converted"] = prepare_distiller(distiller, world, torch.device("cpu"), prepare=DistributedDataParallel)
        kinds = [type(m) for m in distiller.student.modules() if isinstance(m, _BatchNorm)]
        out["student_bn"] = (len(kinds), sum(k is HostSyncBatchNorm for k in kinds))
        out["teacher_bn"] = sorted({type(m).__name__ for m in distiller.teacher.modules() if isinstance(m, _BatchNorm)})
        optimizer = torch.optim.SGD(distiller.trainable.parameters(), lr=0.01)
        with collective_check.guard():  # a host tensor in a collective fails here, as NCCL would on GPUs
            losses = distiller(*batch_of(rank))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        out["ddp"] = stats(distiller.student)
        out["teacher_unchanged"] = all(torch.equal(v, teacher_before[k]) for k, v in distiller.teacher.state_dict().items())
        out["teacher_eval"] = not distiller.teacher.training

        # a lone layer: its output and input gradient are one BatchNorm2d's over both ranks' inputs
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(2, 4, 3, 3, generator=g) * (1 + 2 * r) + r for r in range(world)]
        ws = [torch.randn(2, 4, 3, 3, generator=g) for _ in range(world)]
        torch.manual_seed(3)
        ref = nn.BatchNorm2d(4)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
        layer = nn.Sequential(nn.BatchNorm2d(4))
        layer.load_state_dict({f"0.{k}": v for k, v in ref.state_dict().items()})
        from kdsweep.train.distiller import sync_batchnorm

        sync_batchnorm(layer, "cpu")
        x = xs[rank].clone().requires_grad_(True)
        y = layer(x)
        (y * ws[rank]).sum().backward()
        dist.all_reduce(layer[0].weight.grad)  # what DDP sums (then averages) of the parameters
        if rank == 0:
            x_all = torch.cat(xs).requires_grad_(True)
            y_all = ref(x_all)
            (y_all * torch.cat(ws)).sum().backward()
            out["lone_ref"] = [a.detach().numpy().copy() for a in (y_all, x_all.grad, ref.weight.grad, ref.running_var)]
        out["lone"] = [a.detach().numpy().copy() for a in (y, x.grad, layer[0].weight.grad, layer[0].running_var)]

        if rank == 0:  # the oracle: one BatchNorm model on both ranks' images; and each rank's image alone
            oracle = {}
            for key, rs in (("both", (0, 1)), ("own0", (0,)), ("own1", (1,))):
                plain = build()
                images = [im for r in rs for im in batch_of(r)[0]]
                targets = [t for r in rs for t in batch_of(r)[1]]
                sum(plain(images, targets).values()).backward()
                oracle[key] = stats(plain.student)
            out["oracle"] = oracle
        queue.put((rank, out))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent instead of a 300 s wait
        queue.put((rank, {"error": f"{type(exc).__name__}: {exc}"}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_workers_synchronise_a_from_scratch_students_batchnorm() -> None:
    """Issue 24.5: with 2 workers the worker turns a from-scratch student's BatchNorm into
    SyncBatchNorm (never the teacher's), so after one step each rank's running statistics are
    those of one BatchNorm over both ranks' images (while the ranks' own statistics differ)."""
    results = _run_ranks(_synced_batchnorm_workers)
    for rank in (0, 1):
        assert "error" not in results[rank], results[rank].get("error")
    r0, r1 = results[0], results[1]
    n, synced = r0["student_bn"]
    assert n > 0 and synced == n == r0["converted"]  # every student BatchNorm, and only those, is synchronised
    assert r0["teacher_bn"] == ["BatchNorm2d"] and r0["teacher_unchanged"] and r0["teacher_eval"]  # never the teacher
    oracle = r0["oracle"]
    differ = [k for k in oracle["own0"] if not np.allclose(oracle["own0"][k], oracle["own1"][k], rtol=1e-3, atol=1e-5)]
    assert len(differ) > len(oracle["own0"]) // 2  # the ranks' own statistics differ: each sees different data
    for key, value in r0["ddp"].items():
        np.testing.assert_allclose(r1["ddp"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)  # the ranks agree
        np.testing.assert_allclose(value, oracle["both"][key], rtol=1e-4, atol=1e-6, err_msg=key)  # global batch
    for rank, res in results.items():  # the lone layer: outputs and input gradients are the global BN's slice
        y_all, gx_all, gw, rv = r0["lone_ref"]
        y, gx, gw_r, rv_r = res["lone"]
        np.testing.assert_allclose(y, y_all[2 * rank:2 * rank + 2], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gx, gx_all[2 * rank:2 * rank + 2], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gw_r, gw, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rv_r, rv, rtol=1e-5, atol=1e-6)


def test_sync_batchnorm_converts_the_trainable_batchnorm_only_and_keeps_the_state() -> None:
    """On a GPU run the student's BatchNorm becomes torch's nn.SyncBatchNorm with the same
    parameters (the very objects) and buffers; the teacher's BatchNorm, the FrozenBatchNorm2d of
    an ImageNet-style backbone and the GroupNorm of the heads stay what they were."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torchvision.ops.misc import FrozenBatchNorm2d

    from kdsweep.train.distiller import HostSyncBatchNorm, sync_batchnorm

    torch.manual_seed(0)
    student = build_detector(ModelConfig(backbone="resnet18", fpn_channels=16, min_size=64, max_size=64,
                                         head_norm=True), K)
    student.backbone.body.bn1 = FrozenBatchNorm2d(64)  # as an ImageNet backbone's stem
    student.train()
    teacher = build_detector(ModelConfig(backbone="resnet18", fpn_channels=32, min_size=128, max_size=128), K)
    distiller = Distiller(student, teacher, {"l2": (1.0, StandInL2(16, 32, 2))}, ("p3", "p4"))
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, _BatchNorm):  # non-default statistics, to see them carried over
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in distiller.state_dict().items()}
    params = {k: id(p) for k, p in distiller.trainable.named_parameters()}
    bn = sum(isinstance(m, _BatchNorm) for m in student.modules())
    teacher_kinds = [type(m) for m in teacher.modules()]
    assert nn.BatchNorm2d in teacher_kinds  # a from-scratch teacher: trainable-kind BatchNorm, frozen

    assert distiller.sync_batchnorm(torch.device("cuda", 0)) == bn > 0
    assert not any(type(m) in (nn.BatchNorm2d, HostSyncBatchNorm) for m in student.modules())
    assert sum(type(m) is nn.SyncBatchNorm for m in student.modules()) == bn
    assert all(m.training for m in student.modules() if isinstance(m, nn.SyncBatchNorm))
    assert isinstance(student.backbone.body.bn1, FrozenBatchNorm2d)
    assert sum(isinstance(m, nn.GroupNorm) for m in student.head.modules()) > 0
    assert [type(m) for m in teacher.modules()] == teacher_kinds  # the teacher keeps its nn.BatchNorm2d
    after = distiller.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert {k: id(p) for k, p in distiller.trainable.named_parameters()} == params

    layer, n = sync_batchnorm(nn.BatchNorm1d(3), "cpu")  # a CPU run gets the host layer
    assert n == 1 and type(layer) is HostSyncBatchNorm
    x = torch.randn(5, 3)
    torch.testing.assert_close(layer(x), nn.BatchNorm1d(3)(x))  # one rank: a plain BatchNorm
