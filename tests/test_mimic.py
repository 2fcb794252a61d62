"""Li et al. 2017 mimicking: region loss, sampling, adapters, and the four terms on the Distiller."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchvision.ops import box_iou, roi_align

from kdsweep.config import ConfigError, ExperimentConfig, KDTermConfig, ModelConfig
from kdsweep.kd.step import KDStep, TeacherOutputs
from kdsweep.kd.term import TermSpec
from kdsweep.train.distiller import build_distiller
from kdsweep.methods import mimic
from kdsweep.methods.mimic import (
    DeconvAdapter,
    FullMapMimicTerm,
    MimicTerm,
    build_mimic,
    build_mimic_full,
    build_mimic_logits,
    one_stage_regions,
    region_mimic_loss,
    sample_rois,
)
from kdsweep.models.detectors import build_detector

K = 3


def model_cfg(arch: str = "retinanet", backbone: str = "resnet18", fpn: int = 16) -> ModelConfig:
    return ModelConfig(arch=arch, backbone=backbone, fpn_channels=fpn, min_size=64, max_size=64, anchor_scale=2.0)


def teacher(arch: str = "retinanet") -> torch.nn.Module:
    torch.manual_seed(1)
    return build_detector(model_cfg(arch, "resnet34", 32), K)


def batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([K])},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0], [40.0, 40.0, 60.0, 62.0]]), "labels": torch.tensor([1, 2])},
    ]
    return images, targets


def distiller(arch: str, *kd: KDTermConfig, scale: float = 1.0):
    torch.manual_seed(0)
    cfg = ExperimentConfig(student=model_cfg(arch), kd=tuple(kd), teacher_scale=scale)
    return build_distiller(cfg, K, teacher(arch))


# ------------------------------------------------------------------------------- region loss
def direct_loss(s: Tensor, t: Tensor, rois: Tensor) -> Tensor:
    """The paper's formula, one region at a time (cells floor(x0)..ceil(x1)-1, at least one)."""
    import math

    total = 0.0
    _, _, h, w = s.shape
    for b, x0, y0, x1, y1 in rois.tolist():
        cx0, cy0 = min(max(math.floor(x0), 0), w - 1), min(max(math.floor(y0), 0), h - 1)
        cx1, cy1 = max(min(math.ceil(x1), w), cx0 + 1), max(min(math.ceil(y1), h), cy0 + 1)
        u, v = s[int(b), :, cy0:cy1, cx0:cx1], t[int(b), :, cy0:cy1, cx0:cx1]
        total = total + ((u - v) ** 2).sum() / u.numel()
    return total / (2 * len(rois))


def hand_made() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, 6, 7, generator=g)
    t = torch.randn(3, 4, 6, 7, generator=g)
    rois = torch.tensor([
        [0, 2.0, 3.0, 3.0, 4.0],  # exactly one cell (x 2, y 3)
        [0, 4.0, 4.0, 4.0, 4.0],  # degenerate box: still one cell
        [1, 0.5, 1.2, 3.7, 4.0],  # fractional edges: cells x 0..3, y 1..3
        [1, 5.5, 0.0, 7.0, 2.5],  # 2 x 3 at the right edge
        [2, 0.0, 0.0, 7.0, 6.0],  # the full map
        [2, -1.0, 4.2, 9.0, 8.0],  # outside the map: clamped
    ])
    return s, t, rois


def test_region_loss_matches_the_per_region_formula_and_its_gradient() -> None:
    s, t, rois = hand_made()
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    fast = region_mimic_loss(s1, t, rois)
    slow = direct_loss(s2, t, rois)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)
    fast.backward()
    slow.backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)
    # one region: the one-cell box is the mean over the C values of that cell, halved
    one = region_mimic_loss(s, t, rois[:1])
    assert torch.allclose(one, 0.5 * ((s[0, :, 3, 2] - t[0, :, 3, 2]) ** 2).mean())
    # the full map: 0.5 * MSE of that image
    full = region_mimic_loss(s, t, rois[4:5])
    assert torch.allclose(full, 0.5 * ((s[2] - t[2]) ** 2).mean(), rtol=1e-5)
    assert region_mimic_loss(s, t, torch.zeros(0, 5)).item() == 0.0


def test_pooled_variant_matches_roi_align() -> None:
    s, t, rois = hand_made()
    rois = rois[[0, 2, 3, 4]]
    got = region_mimic_loss(s, t, rois, pooled=3)
    want = 0.0
    for roi in rois:
        u = roi_align(s, roi[None], output_size=3, spatial_scale=1.0, aligned=True)
        v = roi_align(t, roi[None], output_size=3, spatial_scale=1.0, aligned=True)
        want = want + ((u - v) ** 2).mean()
    assert torch.allclose(got, want / (2 * len(rois)), rtol=1e-5)


# ---------------------------------------------------------------------------------- sampling
def jitter(box: Tensor, n: int, amount: float, g: torch.Generator) -> Tensor:
    return box + (torch.rand(n, 4, generator=g) - 0.5) * amount


def test_sample_rois_balances_positives_and_negatives() -> None:
    g = torch.Generator().manual_seed(0)
    gt = torch.tensor([[20.0, 20.0, 60.0, 60.0]])
    near = jitter(gt, 200, 6.0, g)  # IoU > 0.5
    far = jitter(torch.tensor([[100.0, 100.0, 140.0, 140.0]]), 200, 10.0, g)
    (rois,) = sample_rois([torch.cat([near, far])], [gt], num=128, generator=g)
    iou = box_iou(rois, gt).max(1).values
    assert rois.shape == (128, 4)
    assert int((iou >= 0.5).sum()) == 64 and int((iou < 0.5).sum()) == 64
    assert torch.all(iou[:64] >= 0.5)  # positives first
    # few positives (10 proposals + the GT box itself): negatives fill in
    (rois,) = sample_rois([torch.cat([near[:10], far])], [gt], num=128, generator=g)
    iou = box_iou(rois, gt).max(1).values
    assert int((iou >= 0.5).sum()) == 11 and int((iou < 0.5).sum()) == 117
    assert any(torch.equal(r, gt[0]) for r in rois)
    # another ratio and threshold; an image without GT is all negatives
    a, b = sample_rois([torch.cat([near, far]), far], [gt, torch.zeros(0, 4)], num=40, positive_fraction=0.25,
                       iou_threshold=0.7, generator=g)
    assert int((box_iou(a, gt).max(1).values >= 0.7).sum()) == 10 and len(a) == 40
    assert len(b) == 40


def test_one_stage_regions_are_gt_plus_background() -> None:
    g = torch.Generator().manual_seed(0)
    gts = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [40.0, 40.0, 60.0, 62.0]]), torch.zeros(0, 4)]
    a, b = one_stage_regions(gts, [(64, 64), (48, 64)], num=16, generator=g)
    assert torch.equal(a[:2], gts[0]) and len(a) == 4  # 1:1
    bg = a[2:]
    assert torch.all(box_iou(bg, gts[0]) < 0.3)
    assert torch.all(bg[:, :2] >= 0) and torch.all(bg[:, 2] <= 64) and torch.all(bg[:, 3] <= 64)
    assert len(b) == 8 and torch.all(b[:, 3] <= 48)  # no GT: num * (1 - f) background boxes
    many = torch.tensor([[float(i), 0.0, i + 8.0, 8.0] for i in range(20)])
    (c,) = one_stage_regions([many], (64, 64), num=8, positive_fraction=0.5, generator=g)
    assert len(c) == 8 and all(any(torch.equal(r, m) for m in many) for r in c[:4])


# ---------------------------------------------------------------------- context terms by hand
def hand_ctx(s: Tensor, t: Tensor, proposals: list[Tensor] | None = None, level: str = "p3") -> KDStep:
    return KDStep(
        student=torch.nn.Module(), teacher=torch.nn.Module(), student_feats={level: s},
        teacher_out=TeacherOutputs(feats={level: t}), levels=(level,), teacher_scale=1.0,
        targets=[{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
                 {"boxes": torch.tensor([[8.0, 8.0, 56.0, 48.0]]), "labels": torch.tensor([2])}],
        image_sizes=[(64, 64), (64, 64)], proposals=proposals,
    )


def test_mimic_term_is_the_region_loss_on_the_sampled_proposals() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 8, 8, 8, generator=g)
    proposals = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [5.0, 7.0, 29.0, 41.0]]),
                 torch.tensor([[30.0, 2.0, 60.0, 20.0]])]
    ctx = hand_ctx(s, t, proposals)
    term = MimicTerm(student_channels=8, teacher_channels=8, num_levels=1)  # 128 per image: takes every candidate
    gts = [tg["boxes"] for tg in ctx.targets]
    boxes = [torch.cat([p, gt]) for p, gt in zip(proposals, gts)]
    rois = mimic.boxes_to_rois(boxes)
    want = region_mimic_loss(s, t, torch.cat([rois[:, :1], rois[:, 1:] / 8], 1))
    assert torch.allclose(term(ctx), want)
    pooled = MimicTerm(student_channels=8, teacher_channels=8, num_levels=1, pooled=2, assign="all")
    assert torch.allclose(pooled(ctx), region_mimic_loss(s, t, torch.cat([rois[:, :1], rois[:, 1:] / 8], 1), pooled=2))


def test_gradients_reach_only_the_student_and_the_adapter() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 8, 8, 8, generator=g, requires_grad=True)
    t = torch.randn(2, 16, 8, 8, generator=g, requires_grad=True)  # a teacher tensor that would take grads
    for term in (MimicTerm(student_channels=8, teacher_channels=16, num_levels=1, adapter=True),
                 FullMapMimicTerm(student_channels=8, teacher_channels=16, num_levels=1, adapter=True)):
        s.grad = t.grad = None
        loss = term(hand_ctx(s, t))  # one-stage path: GT + background regions
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert t.grad is None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())


def test_deconv_adapter_doubles_the_map() -> None:
    x = torch.randn(2, 16, 8, 8)
    assert DeconvAdapter(16, 32)(x).shape == (2, 32, 16, 16)
    assert DeconvAdapter(16, 32, scale=4)(x).shape == (2, 32, 32, 32)
    with pytest.raises(ValueError, match="power of 2"):
        DeconvAdapter(16, 32, scale=3)


# ------------------------------------------------------------------------- config validation
def spec(student_channels: int, teacher_channels: int, num_levels: int, student=None, teacher=None, **params) -> TermSpec:
    """A builder's input; the region terms read the models only for their kind (two-stage or not)."""
    return TermSpec(name="mimic", loss="mimic", student=student, teacher=teacher, student_channels=student_channels,
                    teacher_channels=teacher_channels, levels=tuple(f"p{2 + i}" for i in range(num_levels)),
                    params=params)



@pytest.mark.parametrize(("builder", "params", "match"), [
    (build_mimic, {"rois": 3}, r"kd.mimic.params.rois is unknown; known: assign, deconv"),
    (build_mimic, {"num_rois": 0}, "num_rois 0 must be an integer >= 1"),
    (build_mimic, {"positive_fraction": 0.0}, r"positive_fraction 0.0 must be in \(0, 1\]"),
    (build_mimic, {"positive_fraction": 1.5}, "positive_fraction 1.5"),
    (build_mimic, {"pooled": 0}, "pooled 0 must be null or an integer >= 1"),
    (build_mimic, {"assign": "nearest"}, "assign 'nearest' is unknown"),
    (build_mimic_full, {"pooled": 2}, r"kd.mimic_full.params.pooled is unknown; known: deconv, deconv_scale"),
])
def test_bad_params_are_one_line_config_errors(builder, params, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        builder(spec(16, 16, 3, **params))
    assert "\n" not in str(info.value)


def test_channel_mismatch_needs_an_adapter_and_heads_need_the_right_models() -> None:
    with pytest.raises(ConfigError, match="set `adapter: true`"):
        build_mimic(spec(16, 32, 3))
    build_mimic(spec(16, 32, 3, deconv=True))  # deconv maps channels
    with pytest.raises(ConfigError, match="kd.mimic_head needs a Faster R-CNN student"):
        distiller("retinanet", KDTermConfig("mimic_head"))
    with pytest.raises(ConfigError, match="must be the same arch"):
        build_mimic_logits(spec(16, 32, 5, student=build_detector(model_cfg("fcos"), K), teacher=teacher()))
    with pytest.raises(ConfigError, match="every student level"):
        distiller("retinanet", KDTermConfig("mimic_logits", levels=("p3",)))


# ------------------------------------------------------------------------------ on the Distiller
def test_faster_rcnn_step_gives_every_mimic_loss_and_no_teacher_grad() -> None:
    d = distiller("fasterrcnn", KDTermConfig("mimic", adapter=True), KDTermConfig("mimic_head"),
                  KDTermConfig("mimic_full", adapter=True), KDTermConfig("mimic_logits"))
    losses = d(*batch())
    kd = {k: v for k, v in losses.items() if k.startswith("kd_")}
    assert set(kd) == {"kd_mimic", "kd_mimic_head_cls", "kd_mimic_head_bbox", "kd_mimic_full",
                       "kd_mimic_logits_cls", "kd_mimic_logits_bbox"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in kd.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    inner = d._inner
    assert all(p.grad is not None for p in inner.terms["mimic"].parameters())
    assert inner.student.roi_heads.box_predictor.cls_score.weight.grad is not None


def test_mimic_head_runs_the_teacher_head_on_the_students_proposals(monkeypatch: pytest.MonkeyPatch) -> None:
    d = distiller("fasterrcnn", KDTermConfig("mimic_head", params={"num_rois": 16}), scale=2.0)
    seen: dict[str, list[Tensor]] = {}
    original = mimic.sample_rois

    def sampled(*args, **kwargs):
        seen["student"] = original(*args, **kwargs)
        return seen["student"]

    monkeypatch.setattr(mimic, "sample_rois", sampled)
    pool = d.teacher.roi_heads.box_roi_pool
    pool_forward = pool.forward

    def spy(x, boxes, image_shapes):
        seen["teacher"], seen["sizes"] = [b.clone() for b in boxes], image_shapes
        seen["teacher_maps"] = {k: v.shape for k, v in x.items()}
        return pool_forward(x, boxes, image_shapes)

    monkeypatch.setattr(pool, "forward", spy)
    losses = d(*batch())
    assert torch.isfinite(losses["kd_mimic_head_cls"]) and torch.isfinite(losses["kd_mimic_head_bbox"])
    assert len(seen["teacher"]) == 2 and all(len(b) == 16 for b in seen["student"])
    for student_boxes, teacher_boxes in zip(seen["student"], seen["teacher"]):
        assert torch.allclose(teacher_boxes, student_boxes * 2.0)
    assert seen["sizes"] == [(128, 128), (128, 128)]
    assert seen["teacher_maps"]["0"][-2:] == (32, 32)  # teacher P2 at its own (2x) resolution


def test_cross_scale_mimic_upsamples_the_half_resolution_student(monkeypatch: pytest.MonkeyPatch) -> None:
    kd = (KDTermConfig("mimic", params={"deconv": True}), KDTermConfig("mimic_full", params={"deconv": True}))
    d = distiller("retinanet", *kd, scale=2.0)
    shapes = []
    original = MimicTerm.maps

    def spy(self, ctx):
        out = original(self, ctx)
        shapes.extend((level, ctx.student_feats[level].shape, s.shape, t.shape) for level, s, t, _ in out)
        return out

    monkeypatch.setattr(mimic._MapTerm, "maps", spy)
    losses = d(*batch())
    assert torch.isfinite(losses["kd_mimic"]) and torch.isfinite(losses["kd_mimic_full"])
    p3 = [x for x in shapes if x[0] == "p3"][0]
    assert p3[1] == (2, 16, 8, 8)  # student sees 64 px
    assert p3[2] == p3[3] == (2, 32, 16, 16)  # deconv output = teacher map at 128 px
    with pytest.raises(ValueError, match="set teacher_scale: 2"):
        distiller("retinanet", *kd, scale=1.0)(*batch())


def test_retinanet_step_gives_finite_mimic_losses() -> None:
    d = distiller("retinanet", KDTermConfig("mimic", adapter=True, params={"num_rois": 8}),
                  KDTermConfig("mimic_full", adapter=True),
                  KDTermConfig("mimic_logits"),
                  KDTermConfig("mimic", adapter=True, params={"pooled": 3, "assign": "all"}))
    losses = d(*batch())
    kd = {k: v for k, v in losses.items() if k.startswith("kd_")}
    assert set(kd) == {"kd_mimic_0", "kd_mimic_1", "kd_mimic_full", "kd_mimic_logits_cls", "kd_mimic_logits_bbox"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in kd.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert d._inner.student.head.classification_head.cls_logits.weight.grad is not None
