"""kdsweep.methods.cwd: channel-wise distillation (Shu et al. 2021), by hand and its invariances."""

from __future__ import annotations

import math

import pytest
import torch

from kdsweep.config import ConfigError
from kdsweep.kd.term import TermSpec
from kdsweep.methods import TERMS
from kdsweep.methods.cwd import cwd_feature_loss


def test_one_channel_by_hand() -> None:
    x = torch.tensor([[[[0.0, 1.0], [2.0, 0.0]]]], requires_grad=True)
    y = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]])
    p = [math.exp(v) for v in (1.0, 0.0, 0.0, 3.0)]
    p = [v / sum(p) for v in p]
    q = [math.exp(v) for v in (0.0, 1.0, 2.0, 0.0)]
    q = [v / sum(q) for v in q]
    kl = sum(a * math.log(a / b) for a, b in zip(p, q))
    loss = cwd_feature_loss(x, y)
    assert loss.item() == pytest.approx(kl, rel=1e-6)
    loss.backward()
    # d KL(p || softmax(x)) / dx = softmax(x) - p
    torch.testing.assert_close(x.grad.flatten(), torch.tensor(q) - torch.tensor(p))


def test_temperature_scales_by_tau_squared_and_the_mean_is_over_samples_and_channels() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    tau = 4.0
    assert cwd_feature_loss(x, y, tau=tau).item() == pytest.approx(tau**2 * cwd_feature_loss(x / tau, y / tau).item())
    per = [cwd_feature_loss(x[n : n + 1, c : c + 1], y[n : n + 1, c : c + 1]).item() for n in range(2) for c in range(3)]
    assert cwd_feature_loss(x, y).item() == pytest.approx(sum(per) / 6)


def test_zero_at_equality_and_blind_to_a_constant_per_channel() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    shift = torch.randn(2, 3, 1, 1, generator=g, dtype=torch.float64) * 50
    assert cwd_feature_loss(y + shift, y).item() == pytest.approx(0.0, abs=1e-9)
    assert cwd_feature_loss(2 * y, y).item() > 0.01


def test_a_bad_temperature_is_refused_when_the_term_is_built() -> None:
    spec = TermSpec(name="cwd", loss="cwd", student=None, teacher=None, student_channels=4, teacher_channels=4,
                    levels=("p3",), params={"tau": 0.0})
    with pytest.raises(ConfigError, match="tau must be > 0"):
        TERMS["cwd"](spec)
