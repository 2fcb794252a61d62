"""kdsweep.methods.crosskd: the student's intermediate head features through the frozen teacher's
head (Wang et al., CVPR 2024), on torchvision's RetinaNet and FCOS."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from kdsweep.config import ConfigError, ExperimentConfig, KDTermConfig, ModelConfig
from kdsweep.methods.crosskd import (
    CROSSKD_DEFAULTS,
    CrossKDTerm,
    _run,
    kd_quality_focal_loss,
    matched_anchors,
    tower_cut,
)
from kdsweep.models.detectors import build_detector
from kdsweep.train.distiller import build_distiller

K = 3


def _cfg(arch: str = "retinanet", width: int = 16, backbone: str = "resnet18") -> ModelConfig:
    return ModelConfig(arch=arch, backbone=backbone, fpn_channels=width, min_size=64, max_size=64, anchor_scale=2.0)


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([K])},
               {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0]]), "labels": torch.tensor([1])}]
    return images, targets


def test_the_cut_is_before_the_index_th_relu_of_each_tower() -> None:
    retina = build_detector(_cfg(), K).head.classification_head.conv
    path, after = tower_cut(retina, 3)  # blocks are Conv2dNormActivation(conv, ReLU): the 3rd block's conv
    assert path == "2.0" and [type(m).__name__ for m in after] == ["ReLU", "Conv2d", "ReLU"]
    fcos = build_detector(_cfg("fcos"), K).head.classification_head.conv
    path, after = tower_cut(fcos, 2)  # flat conv, GroupNorm, ReLU: the 2nd GroupNorm's output
    assert path == "4" and [type(m).__name__ for m in after] == ["ReLU"] + ["Conv2d", "GroupNorm", "ReLU"] * 2
    with pytest.raises(ValueError, match="outside 1..4"):
        tower_cut(retina, 5)


def test_quality_focal_kd_by_hand() -> None:
    z, t = torch.tensor([0.3]), torch.tensor([-1.2])
    p, q = torch.sigmoid(z), torch.sigmoid(t)
    bce = -(q * torch.log(p) + (1 - q) * torch.log(1 - p))
    assert kd_quality_focal_loss(z, t).item() == pytest.approx((bce * (p - q).abs()).item(), rel=1e-6)
    assert kd_quality_focal_loss(t, t).item() == 0.0


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_a_student_identical_to_its_teacher_has_nothing_to_learn(arch: str) -> None:
    torch.manual_seed(0)
    teacher = build_detector(_cfg(arch), K)
    distiller = build_distiller(ExperimentConfig(student=_cfg(arch), kd=(KDTermConfig("crosskd"),)), K, teacher)
    student = distiller._inner.student
    student.load_state_dict(teacher.state_dict())
    for m in student.modules():  # batch statistics would differ from the eval-mode teacher's running ones
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    losses = distiller(*_batch())
    assert losses["kd_crosskd_cls"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["kd_crosskd_reg"].item() == pytest.approx(0.0, abs=1e-4)
    term = distiller._inner.terms["crosskd"]
    assert isinstance(term, CrossKDTerm) and term.index == CROSSKD_DEFAULTS[arch]["index"]


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_the_kd_gradient_passes_through_the_teachers_head_into_the_students_layers_before_the_cut(arch: str) -> None:
    torch.manual_seed(1)
    teacher = build_detector(_cfg(arch, 32, "resnet34"), K)
    before = copy.deepcopy(teacher.state_dict())
    distiller = build_distiller(ExperimentConfig(student=_cfg(arch), kd=(KDTermConfig("crosskd", adapter=True),)), K,
                                teacher)
    inner = distiller._inner
    losses = distiller(*_batch())
    assert losses["kd_crosskd_cls"].item() > 0 and losses["kd_crosskd_reg"].item() > 0
    (losses["kd_crosskd_cls"] + losses["kd_crosskd_reg"]).backward()
    head = inner.student.head
    index = CROSSKD_DEFAULTS[arch]["index"]
    convs = [m for m in head.classification_head.conv.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs[:index])
    assert all(c.weight.grad is None for c in convs[index:])  # after the cut: the ground truth's alone
    assert head.classification_head.cls_logits.weight.grad is None
    assert head.regression_head.bbox_reg.weight.grad is None
    assert inner.student.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in inner.terms["crosskd"].adapters.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    torch.optim.SGD(inner.parameters(), lr=0.1).step()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for p in distiller.parameters())  # the teacher is nobody's submodule


@pytest.mark.parametrize("arch, head_norm", [("retinanet", False), ("retinanet", True), ("fcos", False)])
def test_the_teacher_side_is_the_teachers_own_head_output_and_the_matching_is_torchvisions(
        arch: str, head_norm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The leaf-by-leaf tower walk and the flattening reproduce torchvision's head exactly (A = 9
    anchors per location on RetinaNet), and the positives' count is the student's own matching."""
    torch.manual_seed(2)
    cfg = dataclasses.replace(_cfg(arch, 32, "resnet34"), head_norm=head_norm)
    teacher = build_detector(cfg, K).eval()
    term = build_distiller(ExperimentConfig(student=dataclasses.replace(_cfg(arch), head_norm=head_norm),
                                            kd=(KDTermConfig("crosskd", adapter=True),)), K, teacher)._inner.terms["crosskd"]
    images, targets = _batch()
    with torch.no_grad():
        batch, _ = teacher.transform(images)
        feats = list(teacher.backbone(batch.tensors).values())
        expected = teacher.head(feats)
        got, classes = {}, teacher.head.classification_head.num_classes
        for tower, (before, after, predictors) in term.teacher_paths(teacher).items():
            got[tower] = torch.cat([term._predict(tower, predictors, _run(after, _run(before, f)), classes)
                                    for f in feats], 1)
    torch.testing.assert_close(got["classification_head"], expected["cls_logits"])
    torch.testing.assert_close(got["regression_head"], expected["bbox_regression"])

    seen = {}
    original = type(teacher.head).compute_loss

    def spy(self, targets, head_outputs, anchors, matched_idxs, *rest):
        seen["matched"] = matched_idxs
        return original(self, targets, head_outputs, anchors, matched_idxs, *rest)

    monkeypatch.setattr(type(teacher.head), "compute_loss", spy)
    with torch.no_grad():
        teacher.train()
        teacher(images, [dict(t) for t in targets])
        teacher.eval()
    anchors = teacher.anchor_generator(batch, feats)
    per_level = [f.shape[-2] * f.shape[-1] * getattr(teacher.head.classification_head, "num_anchors", 1) for f in feats]
    mine = matched_anchors(teacher, [dict(t) for t in targets], anchors, per_level)
    assert all(torch.equal(a, b) for a, b in zip(mine, seen["matched"]))
    assert sum(int((m >= 0).sum()) for m in mine) > 0


def test_a_batch_with_an_image_without_boxes_trains() -> None:
    torch.manual_seed(1)
    teacher = build_detector(_cfg("retinanet", 32, "resnet34"), K)
    distiller = build_distiller(ExperimentConfig(student=_cfg(), kd=(KDTermConfig("crosskd", adapter=True),)), K,
                                teacher)
    images, targets = _batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = distiller(images, targets)
    assert all(torch.isfinite(losses[k]) for k in ("kd_crosskd_cls", "kd_crosskd_reg"))
    distiller.trainable.zero_grad()
    (losses["kd_crosskd_cls"] + losses["kd_crosskd_reg"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in distiller.trainable.parameters() if p.grad is not None)


def test_what_crosskd_cannot_run_on_is_refused_in_one_line() -> None:
    teacher = build_detector(_cfg(width=32, backbone="resnet34"), K)
    cases = [
        (ExperimentConfig(student=_cfg("fasterrcnn"), kd=(KDTermConfig("crosskd", adapter=True),)), teacher,
         "dense-head student"),
        (ExperimentConfig(student=_cfg("fcos"), kd=(KDTermConfig("crosskd", adapter=True),)), teacher,
         "both must be fcos"),
        (ExperimentConfig(student=_cfg(), kd=(KDTermConfig("crosskd"),)), teacher, "set `adapter: true`"),
        (ExperimentConfig(student=_cfg(), kd=(KDTermConfig("crosskd", adapter=True, levels=("p3",)),)), teacher,
         "uses every level"),
        (ExperimentConfig(student=_cfg(), kd=(KDTermConfig("crosskd", adapter=True, params={"index": 9}),)), teacher,
         "params.index"),
    ]
    for exp, t, match in cases:
        with pytest.raises(ConfigError, match=match):
            build_distiller(exp, K, t)
    with pytest.raises(ConfigError, match="set teacher_scale and student_scale to 1"):
        build_distiller(ExperimentConfig(student=_cfg(), kd=(KDTermConfig("crosskd", adapter=True),), teacher_scale=2.0),
                        K, teacher)
    other_anchors = build_detector(dataclasses.replace(_cfg(width=32, backbone="resnet34"), anchor_scale=4.0), K)
    with pytest.raises(ConfigError, match="set teacher.anchor_scale equal to student.anchor_scale"):
        build_distiller(ExperimentConfig(student=_cfg(), kd=(KDTermConfig("crosskd", adapter=True),)), K, other_anchors)
    for params, match in (({"index": 2.5}, "params.index must be an integer"),
                          ({"cls_weight": "high"}, "params.cls_weight must be a number")):
        with pytest.raises(ConfigError, match=match):
            build_distiller(ExperimentConfig(student=_cfg(), kd=(KDTermConfig("crosskd", adapter=True, params=params),)),
                            K, teacher)


@pytest.mark.parametrize("matching", ["hand-made", "torchvision's"])
def test_the_normaliser_is_the_positive_count_and_ignored_anchors_are_left_out(
        matching: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins Eq. 4-5's normalisation with the per-element losses set to 1 (KD-QFL) and the GIoU
    loss set to 1, so that ``cls = C * #valid / n_pos`` (C logits per anchor) and ``reg = sum_{a valid} sigmoid(max_k
    t_ak) / n_pos`` exactly: ``n_pos`` the foreground anchors (matched index >= 0) of the batch,
    not the anchor count; "valid" leaves out RetinaNet's ignored anchors (matched -2,
    BETWEEN_THRESHOLDS).

    Hand-made matching on 2 images of R anchors each: image 0 has positives at anchors 0, 1, 2
    (GT 0) and ignored 3, 4, 5; image 1 a positive at 10 (GT 0) and ignored 11, 12. So n_pos = 4,
    #valid = 2R - 5 and cls = C (2R - 5) / 4. With torchvision's own matching of the test batch,
    the counts come from the matching (which has both positives and ignored anchors)."""
    from kdsweep.methods import crosskd

    torch.manual_seed(1)
    teacher = build_detector(_cfg("retinanet", 32, "resnet34"), K)
    distiller = build_distiller(ExperimentConfig(student=_cfg(), kd=(KDTermConfig("crosskd", adapter=True),)), K,
                                teacher)
    seen: dict = {}
    real_matching = crosskd.matched_anchors

    def matching_spy(student, targets, anchors, per_level):
        matched = real_matching(student, targets, anchors, per_level)
        if matching == "hand-made":
            matched = [torch.full_like(m, -1) for m in matched]
            matched[0][[0, 1, 2]], matched[0][[3, 4, 5]] = 0, -2
            matched[1][10], matched[1][[11, 12]] = 0, -2
        seen["matched"] = torch.stack(matched)
        return matched

    def qfl_ones(logits, teacher_logits, beta=1.0):
        seen["t_logits"] = teacher_logits.detach()
        return torch.ones_like(logits)

    monkeypatch.setattr(crosskd, "matched_anchors", matching_spy)
    monkeypatch.setattr(crosskd, "kd_quality_focal_loss", qfl_ones)
    monkeypatch.setattr(crosskd, "generalized_box_iou_loss", lambda a, b, reduction="none": torch.ones(a.shape[0]))
    losses = distiller(*_batch())
    matched = seen["matched"]
    n, r = matched.shape
    if matching == "hand-made":
        n_pos, valid = 4, torch.ones(n, r, dtype=torch.bool)
        valid[0, 3:6] = valid[1, 11:13] = False
        assert n == 2 and int(valid.sum()) == 2 * r - 5
    else:
        n_pos, valid = int((matched >= 0).sum()), matched != -2
        assert 0 < n_pos < int(valid.sum()) < n * r  # the batch has positives and ignored anchors
    classes = distiller._inner.student.head.classification_head.num_classes  # K + 1 (torchvision's background)
    assert seen["t_logits"].shape == (n, r, classes)
    assert losses["kd_crosskd_cls"].item() == pytest.approx(classes * int(valid.sum()) / n_pos, rel=1e-6)
    confidence = seen["t_logits"].max(-1).values.sigmoid()  # (N, R): RetinaNet's boxes always have an area
    assert losses["kd_crosskd_reg"].item() == pytest.approx(float(confidence[valid].sum()) / n_pos, rel=1e-5)
