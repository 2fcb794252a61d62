"""Tests of kdsweep.methods.scalekd.csa: ScaleKD's cross-scale assistant and its distillation losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.retinanet import RetinaNetHead

from kdsweep.config import ConfigError
from kdsweep.methods.scalekd.csa import (
    CrossScaleAssistant,
    CSAHead,
    MultiScaleCrossAttention,
    anchor_matches,
    csa_distill_losses,
    pad_to_multiple,
)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights and biases everywhere (no zero biases or average-pool kernels)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _reference_attention(m: MultiScaleCrossAttention, xq: Tensor, xk: Tensor, xv: Tensor) -> Tensor:
    """All ratios 1, by hand: explicit 1x1 linears, matmul and softmax (no SDPA)."""
    n, c, h, w = xq.shape
    d = m.head_dim

    def linear(conv: torch.nn.Conv2d, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, HW, C_out)
        return x.flatten(2).transpose(1, 2) @ conv.weight[:, :, 0, 0].T + conv.bias

    q = linear(m.q_proj, xq)  # (N, HW, C)
    heads = []
    for i, branch in enumerate(m.branches):
        k = linear(branch.key_proj, xk)  # (N, HW, g*d)
        v = linear(branch.value_proj, xv)
        v2d = v.transpose(1, 2).reshape(n, -1, h, w)
        local = F.conv2d(v2d, branch.value_local.weight, branch.value_local.bias, padding=1, groups=v2d.shape[1])
        v = v + local.flatten(2).transpose(1, 2)
        for j in range(m.heads_per_group):
            head = i * m.heads_per_group + j
            qh = q[..., head * d : (head + 1) * d]
            kh = k[..., j * d : (j + 1) * d]
            vh = v[..., j * d : (j + 1) * d]
            attn = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
            heads.append(attn @ vh)
    o = torch.cat(heads, dim=-1)  # (N, HW, C)
    out = o @ m.out_proj.weight[:, :, 0, 0].T + m.out_proj.bias
    return xv + out.transpose(1, 2).reshape(n, c, h, w)  # the residual: the values' map, the student's in both readings


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("ratios", [(1,), (1, 1)])
def test_all_ratios_one_equals_explicit_reference(ratios: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    m = MultiScaleCrossAttention(8, 6, num_heads=4, ratios=ratios).double()
    _randomize(m)
    xq = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    xk = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    xv = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(m(xq, xk, xv), _reference_attention(m, xq, xk, xv))


def test_odd_sizes_keep_the_query_shape() -> None:
    m = MultiScaleCrossAttention(8, 12, num_heads=4, ratios=(1, 2, 4, 8))
    s = torch.randn(2, 8, 5, 7, requires_grad=True)
    t = torch.randn(2, 12, 10, 14)
    out = m(s, t, s)
    assert out.shape == s.shape
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())  # every ratio's branch is used
    for x, r, expected in [(s, 2, (6, 8)), (s, 8, (8, 8)), (s[..., :1, :3], 4, (4, 4))]:
        assert pad_to_multiple(x, r).shape[-2:] == expected


def test_tiny_map_collapses_to_one_token() -> None:
    """A map smaller than r: one key/value token, so every query gets the same attention output."""
    m = MultiScaleCrossAttention(4, 4, num_heads=1, ratios=(8,))
    s, t = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
    k, v = m.branches[0](t, s)
    assert k.shape[-2:] == v.shape[-2:] == (1, 1)
    o = m(s, t, s) - s  # = out_proj(constant attention output)
    torch.testing.assert_close(o, o[..., :1, :1].expand_as(o))


def test_high_resolution_key_map_is_average_pooled_to_the_student_grid() -> None:
    m = MultiScaleCrossAttention(8, 6, num_heads=2, ratios=(1, 2))
    _randomize(m, seed=1)
    s = torch.randn(2, 8, 5, 7)
    t_big = torch.randn(2, 6, 10, 14)
    out = m(s, t_big, s)
    assert out.shape == s.shape
    torch.testing.assert_close(out, m(s, F.avg_pool2d(t_big, 2), s))
    assert m(s, torch.randn(2, 6, 9, 4), s).shape == s.shape  # any size, even smaller in one axis


# ----------------------------------------------------------------------------- head and assistant


def _levels(channels: int, sizes, n: int = 2, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, h, w, generator=g) for h, w in sizes]


def test_csa_head_with_four_convs_is_a_retinanet_head() -> None:
    a, k = 3, 5
    csa = CSAHead(8, a, k, num_convs=4)
    _randomize(csa, seed=2)
    ref = RetinaNetHead(8, a, k)
    ref.load_state_dict(csa.state_dict())  # strict: same keys and shapes
    x = _levels(8, [(4, 6), (2, 3)])
    out, expected = csa(x), ref(x)
    assert out.keys() == expected.keys() == {"cls_logits", "bbox_regression"}
    for key in out:
        torch.testing.assert_close(out[key], expected[key])


def test_csa_head_ordering_by_hand() -> None:
    """Anchor index = level offset + (h * W + w) * A + a; cls channel a * K + k, box a * 4 + j."""
    a_, k_ = 3, 5
    head = CSAHead(8, a_, k_, num_convs=2)
    _randomize(head, seed=3)
    assert len(head.classification_head.conv) == len(head.regression_head.conv) == 2
    sizes = [(4, 6), (3, 5)]
    x = _levels(8, sizes)
    out = head(x)
    total = sum(h * w for h, w in sizes) * a_
    assert out["cls_logits"].shape == (2, total, k_)
    assert out["bbox_regression"].shape == (2, total, 4)
    cls_map = head.classification_head.cls_logits(head.classification_head.conv(x[1]))
    box_map = head.regression_head.bbox_reg(head.regression_head.conv(x[1]))
    n, hh, ww, a, k, j = 1, 2, 3, 2, 4, 1
    index = sizes[0][0] * sizes[0][1] * a_ + (hh * sizes[1][1] + ww) * a_ + a
    torch.testing.assert_close(out["cls_logits"][n, index, k], cls_map[n, a * k_ + k, hh, ww])
    torch.testing.assert_close(out["bbox_regression"][n, index, j], box_map[n, a * 4 + j, hh, ww])


def test_assistant_output_is_its_head_on_attended_levels_and_trains_only_itself() -> None:
    torch.manual_seed(0)
    csa = CrossScaleAssistant(8, 12, num_levels=2, num_anchors=3, num_classes=4, num_heads=4, ratios=(1, 2))
    sizes = [(5, 7), (3, 4)]
    student = [x.requires_grad_() for x in _levels(8, sizes, seed=1)]
    teacher = _levels(12, [(2 * h, 2 * w) for h, w in sizes], seed=2)
    out = csa([s.detach() for s in student], teacher)
    torch.testing.assert_close(out["cls_logits"], csa.head(csa.features(student, teacher))["cls_logits"])
    total = sum(h * w for h, w in sizes) * 3
    assert out["cls_logits"].shape == (2, total, 4) and out["bbox_regression"].shape == (2, total, 4)
    # the student RetinaNet head's own compute_loss supervises the assistant's outputs
    student_head = RetinaNetHead(8, 3, 4)
    anchors = [torch.rand(total, 2).repeat(1, 2) * 50 + torch.tensor([0.0, 0.0, 10.0, 10.0])] * 2
    matched = [torch.full((total,), -1, dtype=torch.long) for _ in range(2)]
    matched[0][:5] = 0
    matched[1][7] = -2  # ignored
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([2])}] * 2
    losses = student_head.compute_loss(targets, out, anchors, matched)
    sum(losses.values()).backward()
    assert all(s.grad is None for s in student)
    assert all(p.grad is None for p in student_head.parameters())
    assert all(p.grad is not None for p in csa.parameters())


# ----------------------------------------------------------------------------- distillation losses


def test_distill_losses_at_equality_floor_and_gradient_flow() -> None:
    g = torch.Generator().manual_seed(4)
    cls = torch.randn(2, 30, 5, generator=g)
    box = torch.randn(2, 30, 4, generator=g)
    foreground = torch.zeros(2, 30, dtype=torch.bool)
    foreground[0, :3] = foreground[1, 5:10] = True  # 3 and 5 positives
    for temperature in (1.0, 2.0):
        student = {"cls_logits": cls.clone().requires_grad_(), "bbox_regression": box.clone().requires_grad_()}
        csa = {"cls_logits": cls.clone().requires_grad_(), "bbox_regression": box.clone().requires_grad_()}
        l_cls, l_box = csa_distill_losses(student, csa, foreground, temperature=temperature)
        p = torch.sigmoid(cls / temperature)
        entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum(dim=(1, 2))  # per image
        torch.testing.assert_close(l_cls, (entropy[0] / 3 + entropy[1] / 5) / 2)
        assert l_box.item() == 0.0
        (l_cls + l_box).backward()
        assert student["cls_logits"].grad is not None and student["bbox_regression"].grad is not None
        torch.testing.assert_close(student["cls_logits"].grad, torch.zeros_like(cls), atol=1e-7, rtol=0)
        assert csa["cls_logits"].grad is None and csa["bbox_regression"].grad is None


def test_distill_losses_by_hand() -> None:
    """Sums over anchors (L_cls: every anchor and class; L_bbox: the positives, 4 coordinates
    summed) over max(1, #positives): per image then averaged (RetinaNet), or over the batch (FCOS)."""
    s_cls = torch.tensor([[[0.0, 1.0], [2.0, -1.0]], [[0.5, 0.5], [-2.0, 3.0]]], requires_grad=True)
    c_cls = torch.tensor([[[math.log(3.0), -5.0], [-5.0, -math.log(3.0)]], [[1.0, -1.0], [0.0, 2.0]]])
    s_box = torch.zeros(2, 2, 4, requires_grad=True)
    c_box = torch.tensor([[[1.0, -1.0, 0.0, 2.0], [4.0, 0.0, 0.0, 0.0]],   # image 0: |d| sums 4 and 4
                          [[0.5, 0.5, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])  # image 1: 1 and (background) 36
    foreground = torch.tensor([[True, True], [True, False]])  # 2 and 1 positives
    bce = F.binary_cross_entropy(torch.sigmoid(s_cls), torch.sigmoid(c_cls), reduction="none").sum(dim=(1, 2))
    student, csa = {"cls_logits": s_cls, "bbox_regression": s_box}, {"cls_logits": c_cls, "bbox_regression": c_box}

    l_cls, l_box = csa_distill_losses(student, csa, foreground)  # per image (RetinaNet)
    torch.testing.assert_close(l_cls, (bce[0] / 2 + bce[1] / 1) / 2)
    assert l_box.item() == pytest.approx(((4 + 4) / 2 + 1 / 1) / 2)  # the background anchor's 36 does not count
    l_cls, l_box = csa_distill_losses(student, csa, foreground, per_image=False)  # the batch (FCOS)
    torch.testing.assert_close(l_cls, bce.sum() / 3)
    assert l_box.item() == pytest.approx((4 + 4 + 1) / 3)
    l_cls, l_box = csa_distill_losses(student, csa, torch.zeros(2, 2, dtype=torch.bool))  # no positive: max(1, 0)
    torch.testing.assert_close(l_cls, bce.mean())
    assert l_box.item() == 0.0
    (l_cls + l_box).backward()
    assert s_cls.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_anchor_matches_are_the_ones_torchvisions_own_loss_uses(arch: str) -> None:
    from kdsweep.config import ModelConfig
    from kdsweep.models.detectors import build_detector

    torch.manual_seed(0)
    model = build_detector(ModelConfig(arch=arch, backbone="resnet18", fpn_channels=8, min_size=64, max_size=64,
                                       anchor_scale=2.0), 2)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 50.0]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    seen = []
    own = model.head.compute_loss
    model.head.compute_loss = lambda t, h, a, m: (seen.append((a, m)), own(t, h, a, m))[1]
    model(list(torch.rand(2, 3, 64, 64)), targets)
    (anchors, expected), = seen
    per_level = [8 * 8, 4 * 4, 2 * 2, 1, 1]  # FCOS's points on P3-P7 of a 64 px input
    got = anchor_matches(model, targets, anchors, per_level)
    assert all(torch.equal(x, y) for x, y in zip(got, expected))
    assert (got[0] >= 0).sum() > 0 and not (got[1] >= 0).any()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_heads": 4, "ratios": (1, 2, 3)}, r"kd\.csa\.params\.ratios \[1, 2, 3\]: num_heads 4 must be a multiple"),
        ({"num_heads": 4, "ratios": ()}, r"ratios \[\]: give a non-empty list"),
        ({"num_heads": 4, "ratios": (1, 0)}, r"ratios \[1, 0\]: give a non-empty list of integers >= 1"),
        ({"num_heads": 4, "ratios": (1, 2.0)}, r"integers >= 1"),
        ({"num_heads": 0, "ratios": (1,)}, r"num_heads 0 must be an integer >= 1"),
        ({"num_heads": 3, "ratios": (1,)}, r"num_heads 3: student channels 8 must be a multiple of num_heads"),
        ({"num_heads": 4, "ratios": (1,), "dropout": 1.0}, r"dropout 1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_attention_params_raise_one_line_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        MultiScaleCrossAttention(8, 8, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_assistant_and_loss_params_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"ratios \[1, 2, 4\]: num_heads 4 must be a multiple"):
        CrossScaleAssistant(8, 8, num_levels=2, num_anchors=1, num_classes=2, num_heads=4, ratios=(1, 2, 4))
    with pytest.raises(ConfigError, match="num_levels"):
        CrossScaleAssistant(8, 8, num_levels=0, num_anchors=1, num_classes=2)
    with pytest.raises(ConfigError, match="num_convs 5"):
        CSAHead(8, 1, 2, num_convs=5)
    x = {"cls_logits": torch.zeros(1, 2, 3), "bbox_regression": torch.zeros(1, 2, 4)}
    fg = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ConfigError, match="temperature 0"):
        csa_distill_losses(x, x, fg, temperature=0.0)
    with pytest.raises(ValueError, match="bbox_regression"):
        csa_distill_losses(x, {**x, "bbox_regression": torch.zeros(1, 3, 4)}, fg)
    with pytest.raises(ValueError, match=r"foreground must be a bool \(N, A\) = \(1, 2\) mask"):
        csa_distill_losses(x, x, torch.ones(1, 3, dtype=torch.bool))
