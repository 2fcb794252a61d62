"""kdsweep.kd.feature: the Lp losses and FeatureTerm (levels, adapters, validation), through the
registry's builders and the step they read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdsweep.config import ConfigError
from kdsweep.kd.feature import FeatureTerm, l1_feature_loss, l2_feature_loss
from kdsweep.kd.step import KDStep, TeacherOutputs
from kdsweep.kd.term import KDTerm, TermSpec
from kdsweep.methods import TERMS
from kdsweep.methods.ssim import ssim_feature_loss


def _levels(channels: int, sizes=(16, 8, 4, 2, 1), n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, s, s, generator=g) for s in sizes]


def _build(loss: str, student_channels: int, teacher_channels: int, num_levels: int, adapter: bool = False,
           **params) -> KDTerm:
    """A feature term through its registry builder (feature terms read neither model)."""
    spec = TermSpec(name=loss, loss=loss, student=None, teacher=None, student_channels=student_channels,
                    teacher_channels=teacher_channels, levels=tuple(f"p{3 + i}" for i in range(num_levels)),
                    adapter=adapter, params=params)
    return TERMS[loss](spec)


def _step(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> KDStep:
    levels = tuple(f"p{3 + i}" for i in range(len(student)))
    return KDStep(student=None, teacher=None, student_feats=dict(zip(levels, student)),
                  teacher_out=TeacherOutputs(feats=dict(zip(levels, teacher))), levels=levels)


# ----------------------------------------------------------------------------- Lp losses


def test_l2_is_mean_squared_error_by_hand() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    y = torch.tensor([[[[1.0, 0.0], [5.0, 4.5]]]])
    loss = l2_feature_loss(x, y)
    assert loss.item() == pytest.approx((0 + 4 + 4 + 0.25) / 4)
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * (x - y).detach() / 4)


def test_l1_is_mean_absolute_error_by_hand() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    y = torch.tensor([[[[1.5, 0.0], [5.0, 4.5]]]])
    loss = l1_feature_loss(x, y)
    assert loss.item() == pytest.approx((0.5 + 2 + 2 + 0.5) / 4)
    loss.backward()
    torch.testing.assert_close(x.grad, torch.sign(x - y).detach() / 4)


@pytest.mark.parametrize("fn", [l1_feature_loss, l2_feature_loss])
def test_lp_identity_and_shape_check(fn) -> None:
    x = torch.randn(2, 3, 5, 7)
    assert float(fn(x, x.clone())) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        fn(x, torch.randn(2, 3, 5, 6))


# ----------------------------------------------------------------------------- FeatureTerm


@pytest.mark.parametrize(
    "fn, params", [(l2_feature_loss, {}), (l1_feature_loss, {}), (ssim_feature_loss, {"gamma": 0.5})]
)
def test_feature_term_sums_levels(fn, params) -> None:
    s, t = _levels(4, seed=1), _levels(4, seed=2)
    term = FeatureTerm(fn, student_channels=4, teacher_channels=4, num_levels=len(s), **params)
    expected = sum(fn(a, b, **params) for a, b in zip(s, t))
    assert term.compare(s, t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert term(_step(s, t)).item() == pytest.approx(expected.item(), rel=1e-6)  # the step's matched maps


def test_feature_term_adapter_shapes_and_gradient() -> None:
    s = [x.requires_grad_(True) for x in _levels(3, sizes=(8, 4))]
    t_source = torch.ones(1, requires_grad=True)
    t = [x * t_source for x in _levels(5, sizes=(8, 4), seed=3)]  # teacher that would carry a gradient
    term = FeatureTerm(ssim_feature_loss, student_channels=3, teacher_channels=5, num_levels=2, adapter=True)
    assert term.adapters is not None and len(term.adapters) == 2
    for conv in term.adapters:
        assert isinstance(conv, nn.Conv2d)
        assert conv.weight.shape == (5, 3, 1, 1)
    term.compare(s, t).backward()
    for conv in term.adapters:
        assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0
    assert all(x.grad is not None for x in s)
    assert t_source.grad is None  # the teacher is detached inside the term


def test_feature_term_adapter_equals_loss_of_adapted_features() -> None:
    s, t = _levels(3, sizes=(6,)), _levels(5, sizes=(6,), seed=4)
    term = FeatureTerm(l2_feature_loss, student_channels=3, teacher_channels=5, num_levels=1, adapter=True)
    assert term.adapters is not None
    assert term.compare(s, t).item() == pytest.approx(l2_feature_loss(term.adapters[0](s[0]), t[0]).item())


def test_channel_mismatch_without_adapter_raises() -> None:
    with pytest.raises(ConfigError, match="set `adapter: true`"):
        _build("ssim", 64, 256, 5)


def test_unknown_param_raises_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        _build("ssim", 8, 8, 1, alfa=1.0)
    assert str(info.value) == (
        "kd.ssim.params.alfa is unknown; known: alpha, beta, gamma, window_size, sigma, normalize, k1, k2"
    )
    with pytest.raises(ConfigError, match=r"kd\.l2\.params\.beta is unknown; known: normalize"):
        _build("l2", 8, 8, 1, beta=1.0)


@pytest.mark.parametrize("params", [{"window_size": 4}, {"alpha": -1.0}, {"normalize": "zscore"}, {"alpha": "x"}])
def test_invalid_param_value_raises_at_build_time(params) -> None:
    with pytest.raises(ConfigError, match=r"kd\.ssim\.params"):
        _build("ssim", 8, 8, 1, **params)


def test_feature_term_checks_levels_and_shapes() -> None:
    term = _build("l2", 4, 4, 2)
    with pytest.raises(ValueError, match="expected 2 levels"):
        term.compare(_levels(4, sizes=(8,)), _levels(4, sizes=(8,)))
    with pytest.raises(ValueError, match="align resolution"):
        term.compare(_levels(4, sizes=(8, 4)), _levels(4, sizes=(8, 2)))


@pytest.mark.parametrize("fn", [l1_feature_loss, l2_feature_loss])
def test_lp_losses_can_take_ssims_min_max_normalisation_so_a_table_isolates_the_loss(fn) -> None:
    """de Rijk & Schneider normalise before any loss: with ``normalize="minmax"`` the Lp loss sees
    what SSIM sees (each sample mapped to [0, 1]), so it ignores a per-sample affine change of
    scale that the raw loss counts; the default stays raw."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    scaled = 5.0 * t + 2.0  # a teacher with another scale: the same structure
    assert fn(s, scaled, normalize="minmax").item() == pytest.approx(fn(s, t, normalize="minmax").item(), rel=1e-5)
    assert fn(s, scaled).item() != pytest.approx(fn(s, t).item(), rel=1e-2)
    from kdsweep.methods.ssim import minmax_normalize

    expected = fn(minmax_normalize(s), minmax_normalize(t))
    torch.testing.assert_close(fn(s, t, normalize="minmax"), expected)
    term = _build(fn.__name__[:2], 4, 4, 1, normalize="minmax")
    torch.testing.assert_close(term.compare([s], [t]), expected)
    with pytest.raises(ConfigError, match="normalize must be 'minmax' or None"):
        _build("l2", 4, 4, 1, normalize="z")
