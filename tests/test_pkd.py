"""kdsweep.methods.pkd: PKD's loss is the mean over channels of 1 - Pearson r (Cao et al. 2022)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdsweep.kd.step import KDStep, TeacherOutputs
from kdsweep.kd.term import TermSpec
from kdsweep.methods import TERMS
from kdsweep.methods.pkd import channel_standardize, pkd_feature_loss


def _pearson_oracle(x: torch.Tensor, y: torch.Tensor) -> float:
    """mean_c (1 - r_c), r_c by numpy over (N, H, W)."""
    xs = x.detach().double().permute(1, 0, 2, 3).reshape(x.shape[1], -1).numpy()
    ys = y.detach().double().permute(1, 0, 2, 3).reshape(y.shape[1], -1).numpy()
    return float(np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(xs, ys)]))


def test_the_loss_is_one_minus_pearson_r_averaged_over_channels() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    x = 0.6 * y + torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    assert pkd_feature_loss(x, y).item() == pytest.approx(_pearson_oracle(x, y), abs=1e-6)


def test_per_channel_affine_maps_do_not_change_it_and_its_range_is_0_to_2() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    a = torch.rand(1, 4, 1, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    b = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64) * 100
    assert pkd_feature_loss(a * x + b, y).item() == pytest.approx(pkd_feature_loss(x, y).item(), abs=1e-6)
    assert pkd_feature_loss(x, 3 * x + 1).item() == pytest.approx(0.0, abs=1e-6)
    assert pkd_feature_loss(-x, x).item() == pytest.approx(2.0, abs=1e-5)  # up to eps
    z = channel_standardize(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(z.var(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-5,
                               rtol=0)


def test_a_constant_channel_gives_no_nan() -> None:
    x = torch.zeros(1, 2, 3, 3, requires_grad=True)
    loss = pkd_feature_loss(x, torch.randn(1, 2, 3, 3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_through_the_registry_the_gradient_reaches_the_student_and_its_adapters_only() -> None:
    spec = TermSpec(name="pkd", loss="pkd", student=None, teacher=None, student_channels=4, teacher_channels=6,
                    levels=("p3", "p4"), adapter=True)
    term = TERMS["pkd"](spec)
    s = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 4, 4, requires_grad=True)]
    t = [torch.randn(2, 6, 8, 8, requires_grad=True), torch.randn(2, 6, 4, 4, requires_grad=True)]
    step = KDStep(student=None, teacher=None, student_feats=dict(zip(("p3", "p4"), s)),
                  teacher_out=TeacherOutputs(feats=dict(zip(("p3", "p4"), t))), levels=("p3", "p4"))
    loss = term(step)
    loss.backward()
    expected = sum(pkd_feature_loss(term.adapters[i](s[i]), t[i]) for i in range(2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)
    assert all(p.grad is not None for p in term.adapters.parameters())
