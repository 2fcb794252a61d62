"""MimicDet with a separately trained teacher (``t_head: external`` + the ``mimicdet_teacher`` KD
term): no T-head/P2 built, the student side recorded per step, the teacher's RoI head run on the
student's own mimic samples, gradients to the S-head only, bad pairings rejected."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops

from kdsweep.config import ConfigError, ExperimentConfig, KDTermConfig, ModelConfig
from kdsweep.train.distiller import build_distiller
from kdsweep.methods.mimicdet.kd import ExternalTeacherMimic
from kdsweep.models.detectors import build_detector
from kdsweep.methods.mimicdet.model import MimicDet, MimicInputs, mimic_similarity

K = 3
REPR = 1024  # torchvision TwoMLPHead representation size of our Faster R-CNN teacher
LOSS_KEYS = {"refine_cls", "refine_reg", "s_cls", "s_reg"}


def student_cfg(**options) -> ModelConfig:
    base = {"t_head": "external", "t_hidden": REPR, "t_samples": 32, "mimic_samples": 8}
    return ModelConfig(arch="mimicdet", backbone="resnet18", fpn_channels=16, min_size=64, max_size=64,
                       options={**base, **options})


def teacher(arch: str = "fasterrcnn", num_classes: int = 0) -> torch.nn.Module:
    torch.manual_seed(1)
    cfg = ModelConfig(arch=arch, backbone="resnet18", fpn_channels=16, min_size=64, max_size=64,
                      anchor_scale=2.0, num_classes=num_classes)
    return build_detector(cfg, K)


def distiller(student: ModelConfig | None = None, *, scale: float = 1.0, params: dict | None = None,
              t: torch.nn.Module | None = None):
    torch.manual_seed(0)
    cfg = ExperimentConfig(student=student or student_cfg(), teacher=ModelConfig(arch="fasterrcnn"),
                           kd=(KDTermConfig("mimicdet_teacher", weight=1.0, params=params or {}),),
                           teacher_scale=scale)
    return build_distiller(cfg, K, t if t is not None else teacher())


def batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([K])},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0], [30.0, 30.0, 62.0, 62.0]]), "labels": torch.tensor([1, 2])},
    ]
    return images, targets


# ------------------------------------------------------------------------------------- the model
def test_external_mode_builds_no_t_head_and_records_the_mimic_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build_detector(student_cfg(), K)
    assert isinstance(model, MimicDet) and model.external_teacher
    assert model.t_head is None and not model.backbone.with_p2
    assert len(model.backbone.fpn.inner_blocks) == 3  # C3..C5 laterals only: no P2 path
    assert model.s_head.reg_fc.out_channels == model.num_anchors * REPR  # the S-head's own regression feature
    sampled = {}
    original = model.sample_rois

    def spy(out, sizes, targets):
        sampled["rois"] = original(out, sizes, targets)
        sampled["refined"] = out.refined
        return sampled["rois"]

    monkeypatch.setattr(model, "sample_rois", spy)
    model.train()
    losses = model(*batch())
    assert set(losses) == LOSS_KEYS  # no t_cls / t_reg / mimic of its own
    inputs = model.last_mimic_inputs
    assert isinstance(inputs, MimicInputs)
    rois, index, _, _ = sampled["rois"]  # the T-samples, drawn as for the own T-head
    assert inputs.image_sizes == [(64, 64), (64, 64)]
    for i in range(2):
        assert torch.equal(inputs.rois[i], rois[i]) and torch.equal(inputs.index[i], index[i])
        clipped = box_ops.clip_boxes_to_image(sampled["refined"][i][index[i]], (64, 64))
        assert torch.equal(inputs.rois[i], clipped)  # refined anchors in input coordinates
        assert 0 < len(inputs.pick[i]) == min(8, len(index[i]))
        assert len(set(inputs.pick[i].tolist())) == len(inputs.pick[i])  # a subset, no repeats
    b = inputs.num_mimic
    assert inputs.s_cls.shape == (b, K + 1) and inputs.s_reg.shape == (b, REPR)
    assert inputs.s_cls.requires_grad and inputs.s_reg.requires_grad
    assert sum(len(r) for r in inputs.mimic_rois) == b
    model.eval()
    with torch.no_grad():
        model(batch()[0])
    assert model.last_mimic_inputs is None  # reset every forward


def test_bad_t_head_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="t_head 'yes' must be true, false or 'external'"):
        build_detector(student_cfg(t_head="yes"), K)
    with pytest.raises(ConfigError, match="needs at least one mimic path"):
        build_detector(student_cfg(mimic_paths=()), K)


# ----------------------------------------------------------------------------- on the Distiller
def test_one_step_gives_a_kd_loss_whose_gradients_reach_the_s_head_only() -> None:
    d = distiller()
    losses = d(*batch())
    assert set(losses) == LOSS_KEYS | {"kd_mimicdet_teacher"}
    kd = losses["kd_mimicdet_teacher"]
    assert kd.dim() == 0 and torch.isfinite(kd) and kd.item() > 0
    kd.backward()
    head = d.student.s_head
    for name, param in [("cls_logits", head.cls_logits.weight), ("cls_tower", head.cls_tower[0].weight),
                        ("reg_tower", head.reg_tower[0].weight), ("reg_fc", head.reg_fc.weight),
                        ("dconv3", head.dconv3.weight), ("fpn p3", d.student.backbone.fpn.layer_blocks[0][0].weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in d.teacher.parameters())


def test_teacher_head_runs_on_the_students_mimic_rois_scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    d = distiller(scale=2.0)
    student = d.student
    roi_heads = d.teacher.roi_heads
    seen: dict = {}
    pool_forward = roi_heads.box_roi_pool.forward

    def pool_spy(x, boxes, image_shapes):
        seen["boxes"], seen["sizes"] = [b.clone() for b in boxes], list(image_shapes)
        seen["maps"] = {k: v.shape for k, v in x.items()}
        return pool_forward(x, boxes, image_shapes)

    monkeypatch.setattr(roi_heads.box_roi_pool, "forward", pool_spy)
    handle = roi_heads.box_head.register_forward_hook(lambda m, i, o: seen.__setitem__("feature", o))
    mimic_from = student.mimic_from

    def from_spy(inputs, t_logits, t_reg, **kw):
        seen["targets"] = (t_logits, t_reg, kw)
        return mimic_from(inputs, t_logits, t_reg, **kw)

    monkeypatch.setattr(student, "mimic_from", from_spy)
    losses = d(*batch())
    handle.remove()
    inputs = student.last_mimic_inputs
    assert len(seen["boxes"]) == 2
    for student_boxes, teacher_boxes in zip(inputs.mimic_rois, seen["boxes"]):
        assert len(student_boxes) > 0
        torch.testing.assert_close(teacher_boxes, student_boxes * 2.0)
    assert seen["sizes"] == [(128, 128), (128, 128)]  # the teacher's own image sizes
    assert list(seen["maps"]) == ["0", "1", "2", "3"] and seen["maps"]["0"][-2:] == (32, 32)  # P2 at 128 px
    t_logits, t_reg, kw = seen["targets"]
    assert t_logits.shape == (inputs.num_mimic, K + 1) and not t_logits.requires_grad
    assert t_reg is seen["feature"] and t_reg.shape == (inputs.num_mimic, REPR)
    assert kw == {"similarity": "cosine", "paths": ("cls", "reg")}  # the student's defaults
    want = mimic_similarity(inputs.s_cls, t_logits) + mimic_similarity(inputs.s_reg, t_reg)
    torch.testing.assert_close(losses["kd_mimicdet_teacher"], want)


def test_cls_path_only_with_l2_needs_no_matching_t_hidden() -> None:
    d = distiller(student_cfg(t_hidden=32, mimic_paths=("cls",), s_cls_loss="sigmoid"), params={"similarity": "l2"})
    term = d._inner.terms["mimicdet_teacher"]
    assert isinstance(term, ExternalTeacherMimic) and term.paths == ("cls",) and term.similarity == "l2"
    kd = d(*batch())["kd_mimicdet_teacher"]
    assert torch.isfinite(kd) and kd.item() > 0
    kd.backward()
    assert d.student.s_head.cls_logits.weight.grad.abs().sum() > 0


# -------------------------------------------------------------------------------- bad pairings
@pytest.mark.parametrize(("student", "teacher_kw", "params", "match"), [
    (student_cfg(t_head=True), {}, {}, "needs a mimicdet student with options.t_head: external, got a MimicDet "
                                       "with its own T-head"),
    (ModelConfig(arch="retinanet", fpn_channels=16, min_size=64, max_size=64), {}, {},
     "needs a mimicdet student with options.t_head: external, got RetinaNet"),
    (None, {"arch": "retinanet"}, {}, "needs a Faster R-CNN teacher .* got RetinaNet; use teacher.arch: fasterrcnn"),
    (None, {"num_classes": 5}, {}, "student predicts 3 classes, the teacher 5; use the same classes"),
    (student_cfg(t_hidden=32), {}, {}, "reg-path feature is 32-d, the teacher's box head gives 1024-d; "
                                       "set student options.t_hidden: 1024"),
    (None, {}, {"similarity": "kl"}, "similarity 'kl' is unknown"),
    (student_cfg(mimic_paths=("reg",)), {}, {"paths": ["cls"]}, r"paths \['cls'\] must be a non-empty subset"),
    (None, {}, {"weights": 2}, "kd.mimicdet_teacher.params.weights is unknown; known: paths, similarity"),
])
def test_bad_pairings_are_one_line_config_errors(student, teacher_kw, params, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        distiller(student, params=params, t=teacher(**teacher_kw))
    assert "\n" not in str(info.value)
