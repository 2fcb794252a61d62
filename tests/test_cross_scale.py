"""Li et al.'s cross-scale student (kdsweep.models.cross_scale): a half-resolution student whose own
deconvolution upsamples its FPN maps, in training and at inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdsweep.config import ExperimentConfig, KDTermConfig, ModelConfig, from_dict, student_model, teacher_model
from kdsweep.kd.step import KDStep
from kdsweep.models.cross_scale import Deconv, UpsampledBackbone, feature_upsample
from kdsweep.models.detectors import build_detector, level_names, level_strides
from kdsweep.orchestrate.space import load_space
from kdsweep.orchestrate.trials import row_configs
from kdsweep.presets import PRESETS
from kdsweep.report.throughput import count_inference_params, count_params
from kdsweep.train.distiller import build_distiller

K = 3
ROOT = Path(__file__).resolve().parents[1]


def frcnn(size: int, upsample: int = 1, fpn: int = 16) -> ModelConfig:
    return ModelConfig(arch="fasterrcnn", backbone="resnet18", fpn_channels=fpn, min_size=size, max_size=size,
                       anchor_scale=2.0, rpn_proposals=50, roi_samples=32, upsample=upsample)


def batch(size: int):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(2)]
    s = size / 64
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]) * s, "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0]]) * s, "labels": torch.tensor([2])}]
    return images, targets


def test_the_deconvolution_doubles_the_map_and_starts_as_bilinear_upsampling() -> None:
    x = torch.randn(2, 8, 5, 7)
    up = Deconv(8, 8, 2, bilinear=True)
    y = up(x)
    assert y.shape == (2, 8, 10, 14)
    # interior positions: bilinear interpolation between neighbours, per channel (no mixing)
    torch.testing.assert_close(y[..., 2:-2, 2:-2], F.interpolate(x, scale_factor=2, mode="bilinear",
                                                                 align_corners=False)[..., 2:-2, 2:-2])
    assert Deconv(8, 8, 4)(x).shape == (2, 8, 20, 28)
    with pytest.raises(ValueError, match="power of 2"):
        Deconv(8, 8, 3)


def test_the_upsampled_student_keeps_its_level_names_at_half_the_stride_and_halves_its_anchors() -> None:
    plain, up = build_detector(frcnn(64), K), build_detector(frcnn(64, upsample=2), K)
    assert isinstance(up.backbone, UpsampledBackbone) and feature_upsample(up) == 2 and feature_upsample(plain) == 1
    assert list(level_names(up).values()) == list(level_names(plain).values()) == ["p2", "p3", "p4", "p5", "p6"]
    assert level_strides(up) == {k: v // 2 for k, v in level_strides(plain).items()}
    assert [s[0] / 2 for s in plain.rpn.anchor_generator.sizes] == [s[0] for s in up.rpn.anchor_generator.sizes]
    # the body and FPN keep their state-dict names: checkpoints of the plain student's parts load
    assert {k for k in plain.state_dict() if k.startswith("backbone.")} < set(up.state_dict())


def test_the_deconvolution_is_part_of_the_student_at_inference() -> None:
    """Li et al.: the deconvolution has an inference cost. It runs in eval, its parameters are in
    the params column, and the detections come from the finer maps."""
    model = build_detector(frcnn(64, upsample=2), K)
    deconv = sum(p.numel() for p in model.backbone.upsample.parameters())
    assert deconv > 0 and count_inference_params(model, 64) == count_params(model)
    assert count_params(model) == count_params(build_detector(frcnn(64), K)) + deconv
    model.eval()
    seen = {}
    hook = model.backbone.upsample["0"].register_forward_hook(lambda m, i, o: seen.update(p2=o.shape))
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    hook.remove()
    assert seen["p2"] == (1, 16, 32, 32) and set(out[0]) == {"boxes", "labels", "scores"}  # P2 of a 64 px input, x2
    model.train()
    losses = model(*batch(64))
    sum(losses.values()).backward()
    assert model.backbone.upsample["0"][0].weight.grad.abs().sum() > 0  # trained by the detection loss


def test_a_half_resolution_student_with_its_deconvolution_mimics_the_full_resolution_teacher_map_for_map() -> None:
    """student_scale 0.5 and upsample 2: the student's P_k is the teacher's P_k size, so the
    teacher's maps are compared as they are (no resizing), regions cut in half-size cells."""
    torch.manual_seed(1)
    teacher = build_detector(frcnn(128, fpn=32), K)
    torch.manual_seed(0)
    cfg = ExperimentConfig(student=frcnn(128, upsample=2), teacher=frcnn(128, fpn=32), student_scale=0.5, teacher_scale=2.0,
                           kd=(KDTermConfig("mimic", adapter=True, params={"num_rois": 8}),))
    assert (student_model(cfg).min_size, teacher_model(cfg).min_size) == (64, 128)
    distiller = build_distiller(cfg, K, teacher)
    seen = {}
    original = KDStep.aligned

    def spy(self, levels=None):
        students, teachers = original(self, levels)
        seen["pairs"] = [(s.shape, t.shape, torch.equal(t, self.teacher_feats[lv]))
                         for s, t, lv in zip(students, teachers, levels or self.levels)]
        return students, teachers

    KDStep.aligned = spy
    try:
        losses = distiller(*batch(128))
    finally:
        KDStep.aligned = original
    assert seen["pairs"] and all(s[-2:] == t[-2:] and same for s, t, same in seen["pairs"])
    assert torch.isfinite(losses["kd_mimic"]) and losses["kd_mimic"].item() > 0


def test_half_resolution_rows_are_half_of_every_presets_resolution_with_the_presets_teacher() -> None:
    space = load_space(ROOT / "search_spaces" / "ablation_mimic.yaml").for_preset("paper")
    paper = PRESETS["paper"].experiment
    rows = row_configs(space, {**paper, "student": {**paper["student"], "arch": "fasterrcnn"},
                               "teacher": {**paper["teacher"], "arch": "fasterrcnn"}})
    half = rows["cross-scale half-res + deconv mimic"]
    assert (student_model(half).min_size, student_model(half).max_size) == (400, 666)
    assert teacher_model(half) == teacher_model(rows["proposal mimic"])  # 800x1333: the same teacher
    quick = row_configs(load_space(ROOT / "search_spaces" / "ablation_mimic.yaml").for_preset("quick"),
                        PRESETS["quick"].experiment)
    assert student_model(quick["cross-scale half-res baseline"]).min_size == 64
    assert quick["cross-scale half-res + deconv only"].student.upsample == 2
    with pytest.raises(Exception, match="student_scale 0.0 must be > 0"):
        from_dict(ExperimentConfig, {"student_scale": 0})


def test_conflicting_cross_scale_settings_fail_with_one_line() -> None:
    from kdsweep.config import ConfigError

    with pytest.raises(ConfigError, match="the student already upsamples its maps"):
        build_distiller(ExperimentConfig(student=frcnn(128, upsample=2), teacher=frcnn(128, fpn=32), student_scale=0.5,
                                         teacher_scale=2.0, kd=(KDTermConfig("mimic", params={"deconv": True}),)),
                        K, build_detector(frcnn(128, fpn=32), K))
    with pytest.raises(ConfigError, match="teacher.upsample"):
        ExperimentConfig(teacher=frcnn(128, upsample=2), kd=(KDTermConfig("mimic"),))
    with pytest.raises(ConfigError, match="model.upsample 8: fasterrcnn's finest level has stride 4; use at most 2"):
        frcnn(64, upsample=8)


def test_a_region_is_mimicked_where_the_upsampled_students_rcnn_pools_it() -> None:
    """The student's RoI pooler reads its scales off the maps: with upsample 2 a 112 px box of the
    half-resolution input pools from p4 (as the 224 px box of the full-resolution teacher does)."""
    from kdsweep.methods.mimic import assign_levels

    model = build_detector(frcnn(128, upsample=2), K)
    feats = model.backbone(torch.zeros(1, 3, 128, 128))
    marked = {key: torch.full_like(m, float(i)) for i, (key, m) in enumerate(feats.items())}  # each map holds its index
    box = torch.tensor([[8.0, 8.0, 120.0, 120.0]])  # 112 px
    index = int(model.roi_heads.box_roi_pool(marked, [box], [(128, 128)]).flatten()[0])
    pooled = list(level_names(model).values())[index]
    assert pooled == "p4"
    levels = ["p2", "p3", "p4", "p5"]
    assert levels[int(assign_levels(box * feature_upsample(model), levels)[0])] == pooled


def test_the_mimic_term_assigns_regions_as_the_upsampled_students_pooler_does(monkeypatch) -> None:
    import kdsweep.methods.mimic as mimic

    seen = {}
    original_assign, original_regions = mimic.assign_levels, mimic.MimicTerm.regions
    def assign(boxes, levels):
        seen.setdefault("assigned", boxes)
        return original_assign(boxes, levels)

    monkeypatch.setattr(mimic, "assign_levels", assign)
    monkeypatch.setattr(mimic.MimicTerm, "regions", lambda self, step: seen.setdefault("regions", original_regions(self, step)))
    torch.manual_seed(1)
    teacher = build_detector(frcnn(128, fpn=32), K)
    torch.manual_seed(0)
    cfg = ExperimentConfig(student=frcnn(128, upsample=2), teacher=frcnn(128, fpn=32), student_scale=0.5, teacher_scale=2.0,
                           kd=(KDTermConfig("mimic", adapter=True, params={"num_rois": 8}),))
    build_distiller(cfg, K, teacher)(*batch(128))
    torch.testing.assert_close(seen["assigned"], 2 * torch.cat(seen["regions"]))  # in the finer maps' own scale
