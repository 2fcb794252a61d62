"""kdsweep.methods.fgd: focal and global distillation (Yang et al., CVPR 2022)."""

from __future__ import annotations

import pytest
import torch

from kdsweep.config import ConfigError, ExperimentConfig, KDTermConfig, ModelConfig
from kdsweep.methods.fgd import FGD_RETINANET, FGDTerm, attention, focal_masks
from kdsweep.models.detectors import build_detector
from kdsweep.train.distiller import build_distiller


def test_masks_by_hand_small_boxes_weigh_as_much_as_large_ones() -> None:
    # stride 8 on a 6x6 map; box 1 covers cells x 1..2, y 0..1 (floor 8/8=1, ceil 16/8=2; floor 0, ceil 8/8=1)
    boxes = [torch.tensor([[8.0, 0.0, 16.0, 8.0], [0.0, 0.0, 40.0, 40.0]])]
    fg, bg = focal_masks(boxes, 6, 6, 8.0)
    small, large = 1 / (2 * 2), 1 / (6 * 6)
    assert fg[0, 0, 1].item() == pytest.approx(small)  # overlap: the larger (small box's) value
    assert fg[0, 4, 4].item() == pytest.approx(large)
    assert fg[0, 5, 5].item() == pytest.approx(large)  # ceil(40/8)=5, inclusive
    assert (fg[0] > 0).all()
    assert bg.sum().item() == 0  # no background cell left
    fg, bg = focal_masks([torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.zeros(0, 4)], 4, 4, 8.0)
    assert (fg[0] > 0).sum().item() == 4 and fg[1].sum().item() == 0
    torch.testing.assert_close(bg.sum(dim=(1, 2)), torch.ones(2))
    assert bg[0, 0, 0].item() == 0 and bg[0, 3, 3].item() == pytest.approx(1 / 12)


def test_attention_sums_to_the_map_size_and_follows_the_magnitude() -> None:
    x = torch.randn(2, 3, 4, 5)
    x[:, :, 1, 2] = 50.0
    spatial, channel = attention(x, 0.5)
    torch.testing.assert_close(spatial.sum(dim=(1, 2)), torch.full((2,), 20.0))
    torch.testing.assert_close(channel.sum(dim=1), torch.full((2,), 3.0))
    assert spatial[:, 1, 2].min().item() > 19


def _oracle(s, t, fg, bg, c) -> dict[str, float]:
    """The paper's Eq. 5 and 7 by explicit loops over one level (no GcBlock: global is tested apart)."""
    T = c["temperature"]
    n, ch, h, w = s.shape
    out = {"fg": 0.0, "bg": 0.0, "attention": 0.0}
    for i in range(n):
        abs_t, abs_s = t[i].abs(), s[i].abs()
        st = h * w * torch.softmax((abs_t.mean(0) / T).flatten(), 0).view(h, w)
        ss = h * w * torch.softmax((abs_s.mean(0) / T).flatten(), 0).view(h, w)
        ct = ch * torch.softmax(abs_t.mean((1, 2)) / T, 0)
        cs = ch * torch.softmax(abs_s.mean((1, 2)) / T, 0)
        for k in range(ch):
            for y in range(h):
                for x in range(w):
                    d = float((s[i, k, y, x] - t[i, k, y, x]) ** 2 * st[y, x] * ct[k])
                    out["fg"] += c["alpha"] * d * float(fg[i, y, x]) / n
                    out["bg"] += c["beta"] * d * float(bg[i, y, x]) / n
        out["attention"] += c["gamma"] * float((cs - ct).abs().sum() + (ss - st).abs().sum()) / n
    return out


def test_focal_and_attention_losses_match_the_equations_by_loops() -> None:
    g = torch.Generator().manual_seed(0)
    term = FGDTerm(student_channels=3, teacher_channels=3, num_levels=1, strides=[8.0])
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    boxes = [torch.tensor([[0.0, 0.0, 12.0, 12.0]]), torch.tensor([[16.0, 8.0, 30.0, 31.0]])]
    parts = term.compare([s], [t], boxes)
    fg, bg = focal_masks(boxes, 4, 4, 8.0)
    expected = _oracle(s, t, fg, bg, FGD_RETINANET)
    for key in ("fg", "bg", "attention"):
        assert parts[key].item() == pytest.approx(expected[key], rel=1e-5)


def test_equal_maps_cost_nothing_at_initialisation_and_the_global_blocks_train() -> None:
    term = FGDTerm(student_channels=8, teacher_channels=8, num_levels=1, strides=[8.0])
    t = torch.randn(2, 8, 4, 4)
    s = t.clone().requires_grad_()
    parts = term.compare([s], [t], [torch.tensor([[0.0, 0.0, 12.0, 12.0]])] * 2)
    assert all(v.item() == pytest.approx(0.0, abs=1e-9) for v in parts.values())  # GC(F) = F at init
    parts = term.compare([torch.randn(2, 8, 4, 4, requires_grad=True)], [t], [torch.zeros(0, 4)] * 2)
    parts["global"].backward()
    assert term.student_gc[0].transform[-1].weight.grad.abs().sum() > 0
    assert term.teacher_gc[0].transform[-1].weight.grad.abs().sum() > 0


def test_on_the_distiller_it_reads_the_targets_and_trains_the_student_not_the_teacher() -> None:
    cfg = ModelConfig(backbone="resnet18", fpn_channels=8, min_size=64, max_size=64, anchor_scale=2.0)
    torch.manual_seed(0)
    teacher = build_detector(ModelConfig(backbone="resnet18", fpn_channels=16, min_size=64, max_size=64,
                                         anchor_scale=2.0), 3)
    distiller = build_distiller(ExperimentConfig(student=cfg, kd=(KDTermConfig("fgd", adapter=True),)), 3, teacher)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0]]), "labels": torch.tensor([2])}]
    losses = distiller(images, targets)
    assert {"kd_fgd_fg", "kd_fgd_bg", "kd_fgd_attention", "kd_fgd_global"} <= set(losses)
    term = distiller._inner.terms["fgd"]
    assert term.strides == (8.0, 16.0, 32.0, 64.0, 128.0)
    (losses["kd_fgd_fg"] + losses["kd_fgd_bg"]).backward()
    assert distiller._inner.student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ConfigError, match="kd.fgd.params.temperature must be > 0"):
        build_distiller(ExperimentConfig(student=cfg, kd=(KDTermConfig("fgd", adapter=True,
                                                                       params={"temperature": 0}),)), 3, teacher)
