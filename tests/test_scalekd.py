"""ScaleKD on the Distiller: sdf on the backbone embedding, csa with its own loss and optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kdsweep.config import ConfigError, ExperimentConfig, KDTermConfig, ModelConfig, TrainConfig
from kdsweep.train.distiller import build_distiller
from kdsweep.kd.term import Need
from kdsweep.methods.scalekd.terms import SCALEKD_DEFAULTS, CSATerm, SDFTerm
from kdsweep.models.detectors import build_detector
from kdsweep.train.engine import train_one_epoch
from kdsweep.train.optim import build_optimization

K = 3


def student_cfg(arch: str = "retinanet") -> ModelConfig:
    return ModelConfig(arch=arch, backbone="resnet18", fpn_channels=16, min_size=64, max_size=64, anchor_scale=2.0)


def teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_detector(ModelConfig(backbone="resnet34", fpn_channels=32, min_size=64, max_size=64, anchor_scale=2.0), K)


def batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([K])},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def scalekd(start: float = 0.0, scale: float = 2.0, sdf: dict | None = None):
    torch.manual_seed(0)
    kd = (
        KDTermConfig("sdf", weight=0.01, params=dict({"embed": 8, "pool": 2}, **(sdf or {}))),
        KDTermConfig("csa", params={"num_heads": 2, "ratios": [1, 2], "start": start}),
    )
    cfg = ExperimentConfig(student=student_cfg(), kd=kd, teacher_scale=scale)
    return build_distiller(cfg, K, teacher())


def test_losses_have_every_part_and_defaults() -> None:
    distiller = scalekd()
    losses = distiller(*batch())
    assert {"kd_sdf", "kd_csa_assist", "kd_csa_cls", "kd_csa_bbox", "classification", "bbox_regression"} <= set(losses)
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    csa = distiller._inner.terms["csa"]
    assert isinstance(csa, CSATerm)
    assert (csa.beta, csa.gamma) == (SCALEKD_DEFAULTS["one_stage"]["beta"], SCALEKD_DEFAULTS["one_stage"]["gamma"])
    own = csa.own_optimizer()
    assert isinstance(own, torch.optim.Adam)
    assert (own.param_groups[0]["lr"], own.param_groups[0]["weight_decay"]) == (3e-4, 1e-4)


def test_sdf_reads_the_last_backbone_stage_of_both_models_at_their_resolutions() -> None:
    distiller = scalekd(scale=2.0)
    seen = {}
    term = distiller._inner.terms["sdf"]
    assert isinstance(term, SDFTerm) and term.needs == {Need.BODY}
    original = SDFTerm.forward

    def spy(self, step):
        seen["s"], seen["t"] = step.student_body.shape, step.teacher_out.body.shape
        return original(self, step)

    SDFTerm.forward = spy
    try:
        distiller(*batch())
    finally:
        SDFTerm.forward = original
    assert seen["s"] == (2, 512, 2, 2)  # resnet18 C5 of a 64 px input
    assert seen["t"] == (2, 512, 4, 4)  # the teacher sees 128 px (teacher_scale 2)


def grads_after(loss: Tensor, module: torch.nn.Module) -> dict[str, bool]:
    module.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in module.named_parameters()}


def test_assistant_loss_trains_only_the_assistant_and_distillation_only_the_student() -> None:
    distiller = scalekd()
    losses = distiller(*batch())
    inner = distiller._inner
    got = grads_after(losses["kd_csa_assist"], inner)
    assert any(v for k, v in got.items() if k.startswith("terms.csa.assistant"))
    assert not any(v for k, v in got.items() if k.startswith("student."))
    got = grads_after(losses["kd_csa_cls"] + losses["kd_csa_bbox"], inner)
    assert any(v for k, v in got.items() if k.startswith("student.head"))
    assert not any(v for k, v in got.items() if k.startswith("terms.csa"))


def test_assistant_joins_at_start_fraction() -> None:
    distiller = scalekd(start=0.5)
    images, targets = batch()
    early = distiller(images, targets, progress=0.2)
    late = distiller(images, targets, progress=0.5)
    for part in ("assist", "cls", "bbox"):
        assert early[f"kd_csa_{part}"].item() == 0.0
        assert late[f"kd_csa_{part}"].item() > 0.0


def test_assistant_has_its_own_optimizer() -> None:
    distiller = scalekd()
    optimization = build_optimization(distiller.trainable, distiller.student, TrainConfig(optimizer="adamw", lr=1e-3),
                                      torch.device("cpu"), steps_per_epoch=4)
    main = [p for g in optimization.optimizer.param_groups for p in g["params"]]
    csa_ids = {id(p) for p in distiller._inner.terms["csa"].parameters()}
    [(own, steps_at)] = optimization.term_optimizers
    assert isinstance(own, torch.optim.Adam) and steps_at(0.0)
    assert {id(p) for g in own.param_groups for p in g["params"]} == csa_ids
    assert own.param_groups[0]["lr"] == 3e-4 and own.param_groups[0]["weight_decay"] == 1e-4
    assert not csa_ids & {id(p) for p in main}
    assert len(main) + len(csa_ids) == sum(1 for p in distiller.trainable.parameters() if p.requires_grad)


def test_the_assistant_is_untouched_before_start_then_trains() -> None:
    """Issue 13: before ``start`` neither the assistant's Adam nor its weight decay may move it."""
    distiller = scalekd(start=0.5)
    optimization = build_optimization(distiller.trainable, distiller.student,
                                      TrainConfig(optimizer="adamw", lr=1e-3, epochs=2, warmup_iters=0, lr_schedule="constant"),
                                      torch.device("cpu"), steps_per_epoch=2)
    assistant = list(distiller._inner.terms["csa"].assistant.parameters())
    before = [p.detach().clone() for p in assistant]
    head = list(distiller.student.head.parameters())
    head_before = [p.detach().clone() for p in head]
    loader = [batch(), batch()]
    train_one_epoch(distiller, optimization, loader, device=torch.device("cpu"), epoch=1, step_offset=0, total_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(before, assistant))  # progress 0 and 0.25: bit-identical
    assert any(not torch.equal(a, b) for a, b in zip(head_before, head))  # the student did train
    train_one_epoch(distiller, optimization, loader, device=torch.device("cpu"), epoch=2, step_offset=2, total_steps=4)
    assert any(not torch.equal(a, b) for a, b in zip(before, assistant))  # from 0.5 on it trains


def test_frozen_backbone_does_not_move_until_the_fraction_then_moves() -> None:
    distiller = scalekd()
    optimization = build_optimization(distiller.trainable, distiller.student,
                                      TrainConfig(optimizer="adamw", lr=1e-3, epochs=2, warmup_iters=0,
                                                  lr_schedule="constant", freeze_backbone=0.5),
                                      torch.device("cpu"), steps_per_epoch=2)
    body = list(distiller.student.backbone.body.parameters())
    head = list(distiller.student.head.parameters())
    before_body = [p.detach().clone() for p in body]
    before_head = [p.detach().clone() for p in head]
    loader = [batch(), batch()]
    train_one_epoch(distiller, optimization, loader, device=torch.device("cpu"), epoch=1, step_offset=0, total_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(before_body, body))
    assert any(not torch.equal(a, b) for a, b in zip(before_head, head))
    train_one_epoch(distiller, optimization, loader, device=torch.device("cpu"), epoch=2, step_offset=2, total_steps=4)
    assert any(not torch.equal(a, b) for a, b in zip(before_body, body))


def test_csa_needs_a_retinanet_student_and_every_level() -> None:
    kd = (KDTermConfig("csa"),)
    with pytest.raises(ConfigError, match="kd.csa needs a RetinaNet student"):
        build_distiller(ExperimentConfig(student=student_cfg("fcos"), kd=kd), K, teacher())
    kd = (KDTermConfig("csa", levels=("p3",)),)
    with pytest.raises(ConfigError, match="every student level"):
        build_distiller(ExperimentConfig(student=student_cfg(), kd=kd), K, teacher())
    kd = (KDTermConfig("csa", params={"ratios": [1, 2, 3]}),)
    with pytest.raises(ConfigError, match="multiple of the number of ratios"):
        build_distiller(ExperimentConfig(student=student_cfg(), kd=kd), K, teacher())
    kd = (KDTermConfig("sdf", params={"source": "head"}),)
    with pytest.raises(ConfigError, match="source 'head' is unknown"):
        build_distiller(ExperimentConfig(student=student_cfg(), kd=kd), K, teacher())
