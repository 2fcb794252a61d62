"""kdsweep.methods.mgd: masked generative distillation (Yang et al., ECCV 2022)."""

from __future__ import annotations

import pytest
import torch

from kdsweep.config import ConfigError
from kdsweep.kd.step import KDStep, TeacherOutputs
from kdsweep.kd.term import TermSpec
from kdsweep.methods import TERMS
from kdsweep.methods.mgd import MGDTerm, random_pixel_mask


def _spec(**params) -> TermSpec:
    return TermSpec(name="mgd", loss="mgd", student=None, teacher=None, student_channels=4, teacher_channels=6,
                    levels=("p3", "p4"), adapter=True, params=params)


def test_the_loss_is_the_sum_of_squares_of_the_generated_map_over_the_batch_size() -> None:
    torch.manual_seed(0)
    term = TERMS["mgd"](_spec())
    s = [torch.randn(2, 4, 6, 6), torch.randn(2, 4, 3, 3)]
    t = [torch.randn(2, 6, 6, 6), torch.randn(2, 6, 3, 3)]
    masks = [torch.randint(0, 2, (2, 1, 6, 6)).float(), torch.randint(0, 2, (2, 1, 3, 3)).float()]
    expected = sum(((term.generators[i](term.adapters[i](s[i]) * masks[i]) - t[i]) ** 2).sum() / 2 for i in range(2))
    assert term.compare(s, t, masks).item() == pytest.approx(expected.item(), rel=1e-6)
    # a dropped pixel contributes nothing of the student's own value there to the generator's input
    m = torch.zeros(2, 1, 6, 6)
    a = term.compare([s[0], s[1]], t, [m, masks[1]])
    b = term.compare([s[0] * 5, s[1]], t, [m, masks[1]])
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_the_mask_drops_pixels_at_the_ratio_and_is_shared_by_the_channels() -> None:
    g = torch.Generator().manual_seed(0)
    like = torch.zeros(1)
    mask = random_pixel_mask(4, 64, 64, 0.65, like=like, generator=g)
    assert mask.shape == (4, 1, 64, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (1 - mask).mean().item() == pytest.approx(0.65, abs=0.02)
    assert random_pixel_mask(1, 8, 8, 0.0, like=like).min().item() == 1.0


def test_gradients_reach_the_student_the_adapter_and_the_generator_not_the_teacher() -> None:
    term = TERMS["mgd"](_spec(mask_ratio=0.5))
    assert isinstance(term, MGDTerm)
    s = {"p3": torch.randn(2, 4, 6, 6, requires_grad=True), "p4": torch.randn(2, 4, 3, 3, requires_grad=True)}
    t = {"p3": torch.randn(2, 6, 6, 6, requires_grad=True), "p4": torch.randn(2, 6, 3, 3, requires_grad=True)}
    term(KDStep(student=None, teacher=None, student_feats=s, teacher_out=TeacherOutputs(feats=t),
                levels=("p3", "p4"))).backward()
    assert all(v.grad is not None for v in s.values()) and all(v.grad is None for v in t.values())
    assert all(p.grad is not None for p in term.generators.parameters())
    assert all(p.grad is not None for p in term.adapters.parameters())


@pytest.mark.parametrize("params, match", [({"mask_ratio": 1.0}, "mask_ratio must be in"),
                                           ({"alpha_mgd": 2e-5}, "kd.mgd.params.alpha_mgd is unknown")])
def test_bad_params_are_one_line_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TERMS["mgd"](_spec(**params))
