"""Feature capture (forward hook on the backbone), teacher extraction and teacher->student alignment."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from kdsweep.config import ModelConfig
from kdsweep.models.detectors import build_detector
from kdsweep.models.taps import FeatureTap, align_to, extract_features, resize_teacher

K = 3
STRIDES = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}


def tiny(size: int = 64, fpn: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", fpn_channels=fpn, min_size=size, max_size=size)
    return build_detector(cfg, K).eval()


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 48, generator=g)]


def test_tap_records_levels_without_changing_outputs() -> None:
    model, imgs = tiny(), images()
    with torch.no_grad():
        plain = model(imgs)
        with FeatureTap(model) as tap:
            tapped = model(imgs)
    feats = tap.pop()
    assert list(feats) == list(STRIDES)
    for name, stride in STRIDES.items():  # both images resized to 64x64, batch padded to 64
        assert feats[name].shape == (2, 16, -(-64 // stride), -(-64 // stride))
    for a, b in zip(plain, tapped):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert tap.pop() == {}  # pop forgets
    with torch.no_grad():
        model(imgs)
    assert tap.features == {}  # hook removed on exit


def test_tap_level_subset_and_unknown_level() -> None:
    model = tiny()
    tap = FeatureTap(model, levels=("p4", "p3"))
    with torch.no_grad():
        model(images())
    assert list(tap.features) == ["p4", "p3"]
    tap.remove()
    with pytest.raises(ValueError, match="p2"):
        FeatureTap(model, levels=("p2",))


def test_extract_features_matches_tap() -> None:
    model, imgs = tiny(), images()
    with torch.no_grad(), FeatureTap(model) as tap:
        model(imgs)
        direct = extract_features(model, imgs)
    assert list(direct) == list(tap.features)
    for name in direct:
        torch.testing.assert_close(direct[name], tap.features[name])
    with torch.no_grad():
        subset = extract_features(model, imgs, levels=["p5"])
    assert list(subset) == ["p5"]


def test_align_to_resizes_high_resolution_teacher() -> None:
    student, teacher = tiny(64, fpn=16), tiny(128, fpn=32)  # teacher_scale 2
    imgs = images()
    with torch.no_grad():
        s_feats = extract_features(student, imgs)
        t_feats = extract_features(teacher, imgs)
    assert t_feats["p3"].shape[-2:] == (16, 16) and s_feats["p3"].shape[-2:] == (8, 8)
    levels = ["p3", "p4", "p5"]
    for scale in (None, 2.0):
        s, t = align_to(s_feats, t_feats, levels, teacher_scale=scale)
        assert [x.shape for x in s] == [s_feats[n].shape for n in levels]
        assert [x.shape for x in t] == [(2, 32, *s_feats[n].shape[-2:]) for n in levels]
    # square canvases: both modes agree; r=2 bilinear averages 2x2 neighbourhoods
    _, t_plain = align_to(s_feats, t_feats, levels)
    _, t_scaled = align_to(s_feats, t_feats, levels, teacher_scale=2.0)
    for a, b, name in zip(t_plain, t_scaled, levels):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, F.avg_pool2d(t_feats[name], 2))


def test_resize_teacher_keeps_content_aligned_on_unequal_padding() -> None:
    # Student canvas 10x12 cells (content 9x12 + 1 padded row); teacher canvas 18x24 (all content).
    teacher = torch.arange(18 * 24, dtype=torch.float32).reshape(1, 1, 18, 24)
    aligned = resize_teacher(teacher, (10, 12), teacher_scale=2.0)
    assert aligned.shape == (1, 1, 10, 12)
    torch.testing.assert_close(aligned[..., :9, :], F.avg_pool2d(teacher, 2))
    torch.testing.assert_close(aligned[..., 9, :], aligned[..., 8, :])  # replicate-padded row
    plain = resize_teacher(teacher, (10, 12))
    assert plain.shape == (1, 1, 10, 12) and not torch.allclose(plain[..., :9, :], aligned[..., :9, :])
    same = torch.rand(1, 2, 5, 6)
    assert resize_teacher(same, (5, 6), 2.0) is same


def test_align_to_casts_teacher_dtype_and_checks_batch() -> None:
    s = {"p3": torch.rand(2, 4, 8, 8)}
    t = {"p3": torch.rand(2, 6, 8, 8, dtype=torch.float64)}
    _, (aligned,) = align_to(s, t, ["p3"])
    assert aligned.dtype == torch.float32
    with pytest.raises(ValueError, match="batch"):
        align_to(s, {"p3": torch.rand(3, 6, 8, 8)}, ["p3"])
