"""Tests of kdsweep.methods.scalekd.sdf: ScaleKD scale-decoupled feature (SDF) distillation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdsweep.config import ConfigError, TrainConfig
from kdsweep.methods.scalekd.sdf import SDFBranches, SDFLoss
from kdsweep.train.optim import build_optimization

SMALL = dict(embed=8, pool=2, hidden_ratio=2)


def _n_params(module: torch.nn.Module) -> int:
    """Weights of the module, trainable or not (the frozen target's need no gradient)."""
    return sum(p.numel() for p in module.parameters())


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- (a) parameter count


def test_shared_bottleneck_one_flatten_mlp_per_branch_as_the_paper() -> None:
    """The paper: one set of weights for the dilated branches; "for each branch, a flatten layer
    (MLP)". So branches add MLPs, not bottlenecks; ``shared_mlp`` keeps one MLP (an option)."""
    one = SDFBranches(8, dilations=(1,), shared=True, **SMALL)
    four = SDFBranches(8, dilations=(1, 2, 3, 4), shared=True, **SMALL)
    block, mlp = _n_params(one.blocks[0]), _n_params(one.mlps[0])
    assert len(four.blocks) == 1 and len(four.mlps) == 4 and four.shared_mlp is False
    assert _n_params(four) == block + 4 * mlp
    all_shared = SDFBranches(8, dilations=(1, 2, 3, 4), shared=True, shared_mlp=True, **SMALL)
    assert _n_params(all_shared) == _n_params(one) == block + mlp
    sep_four = SDFBranches(8, dilations=(1, 2, 3, 4), shared=False, **SMALL)
    assert _n_params(sep_four) == 4 * (block + mlp)
    loss_four = SDFLoss(student_channels=8, teacher_channels=8, num_levels=2, dilations=[1, 2, 3, 4], **SMALL)
    assert _n_params(loss_four) == 2 * _n_params(four)


# ----------------------------------------------------------------------------- (b) dilation really used


def _reference_branch(module: SDFBranches, x: torch.Tensor, d: int) -> torch.Tensor:
    blk = module.blocks[0]
    y = F.conv2d(x, blk.reduce.weight)
    y = F.relu(F.group_norm(y, blk.norm1.num_groups, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps))
    y = F.conv2d(y, blk.conv.weight, padding=d, dilation=d)
    y = F.relu(F.group_norm(y, blk.norm2.num_groups, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps))
    return x + F.conv2d(y, blk.expand.weight, blk.expand.bias)


def test_shared_branches_use_their_dilation() -> None:
    torch.manual_seed(0)
    dilations = (1, 2, 3)
    module = SDFBranches(8, dilations=dilations, shared=True, **SMALL)
    x = _randn(2, 8, 9, 11)
    maps = module.branch_maps(x)
    for d, z in zip(dilations, maps):
        torch.testing.assert_close(z, _reference_branch(module, x, d), rtol=1e-5, atol=1e-5)
    # the rates make a difference (otherwise the check above would be vacuous)
    assert not torch.allclose(maps[0], maps[1]) and not torch.allclose(maps[1], maps[2])
    # forward = concatenation of each branch's own MLP over its branch map
    expected = torch.cat([mlp(z) for mlp, z in zip(module.mlps, maps)], dim=1)
    torch.testing.assert_close(module(x), expected)
    shared_mlp = SDFBranches(8, dilations=dilations, shared=True, shared_mlp=True, **SMALL)
    maps = shared_mlp.branch_maps(x)
    torch.testing.assert_close(shared_mlp(x), torch.cat([shared_mlp.mlps[0](z) for z in maps], dim=1))


def test_the_default_term_is_the_papers_bare_sdf_loss_without_an_l2_on_the_embedding() -> None:
    """A single L2 between the concatenated flatten layers and nothing else (``direct`` 0): a
    student whose SDF outputs equal the teacher's has zero loss even where its embedding differs."""
    torch.manual_seed(0)
    loss = SDFLoss(student_channels=8, teacher_channels=8, num_levels=1, **SMALL)
    assert loss.direct == 0.0
    s, t = _randn(2, 8, 6, 6, seed=1).requires_grad_(True), _randn(2, 8, 6, 6, seed=2)
    sdf = loss.branches[0]
    torch.testing.assert_close(loss([s], [t]), F.mse_loss(sdf(s), sdf(t).detach()))
    anchored = SDFLoss(student_channels=8, teacher_channels=8, num_levels=1, direct=0.5, **SMALL)
    anchored.load_state_dict(loss.state_dict())
    torch.testing.assert_close(anchored([s], [t]), loss([s], [t]) + 0.5 * F.mse_loss(s, t))


def test_pooling_dilutes_a_one_position_bright_spot_by_the_cell_size_and_does_not_erase_it() -> None:
    """C5 of a 512-px image is 16x16: one small object is one bright position. The flatten MLP's
    4x4 pooling averages it over a 4x4 cell (1/16), global pooling over the map (1/256). The SDF
    target moves with the spot (by 7.6 % of its norm at pool 4 with this seed, 2.2 % at pool 1,
    12.8 % at pool 16), less the coarser the pooling; a pool as large as the map keeps every
    position."""
    base = _randn(1, 8, 16, 16, seed=3)
    spot = base.clone()
    spot[..., 5, 9] += 3.0  # one position, about three standard deviations

    def moved(pool: int) -> float:
        torch.manual_seed(0)
        sdf = SDFBranches(8, dilations=(1,), embed=64, pool=pool, hidden_ratio=2)
        with torch.no_grad():
            return (sdf(spot) - sdf(base)).norm().item() / sdf(base).norm().item()

    m1, m4, m16 = moved(1), moved(4), moved(16)
    assert m4 > 0.03  # the spot moves the target: not averaged away at the default pool 4
    assert m16 > m4 > m1  # each coarser pooling dilutes it more
    with torch.no_grad():  # pool = map size: the pooled grid is the map itself
        sdf = SDFBranches(8, dilations=(1,), embed=4, pool=16, hidden_ratio=2)
        z = sdf.branch_maps(spot)[0]
        torch.testing.assert_close(F.adaptive_avg_pool2d(z, 16), z)


def test_separate_branches_have_own_weights() -> None:
    torch.manual_seed(0)
    module = SDFBranches(8, dilations=(2, 2), shared=False, **SMALL)
    out = module(_randn(1, 8, 6, 6))
    assert not torch.allclose(out[:, :8], out[:, 8:])  # same dilation, different weights


# ----------------------------------------------------------------------------- (c) identity


@pytest.mark.parametrize("direct", [1.0, 0.0])
def test_identical_inputs_give_zero(direct: float) -> None:
    torch.manual_seed(0)
    loss = SDFLoss(student_channels=8, teacher_channels=8, num_levels=2, direct=direct, **SMALL)
    feats = [_randn(2, 8, 6, 5, seed=1), _randn(2, 8, 3, 3, seed=2)]
    value = loss(feats, [f.clone() for f in feats])
    assert value.shape == ()
    assert value.item() == 0.0


def test_different_inputs_give_positive_loss() -> None:
    torch.manual_seed(0)
    loss = SDFLoss(student_channels=8, teacher_channels=8, num_levels=1, direct=0.0, **SMALL)
    assert loss([_randn(2, 8, 6, 6, seed=1)], [_randn(2, 8, 6, 6, seed=2)]).item() > 0


# ----------------------------------------------------------------------------- (d) gradients


@pytest.mark.parametrize("adapter", [False, True])
def test_gradients_reach_student_and_module_not_teacher(adapter: bool) -> None:
    """``target: bare`` (the module trained through the student side)."""
    torch.manual_seed(0)
    cs = 6 if adapter else 8
    loss = SDFLoss(student_channels=cs, teacher_channels=8, num_levels=1, adapter=adapter, target="bare", **SMALL)
    s = _randn(2, cs, 5, 5, seed=1).requires_grad_(True)
    t = _randn(2, 8, 5, 5, seed=2).requires_grad_(True)
    loss([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    sdf = loss.branches[0]
    for p in (sdf.blocks[0].reduce.weight, sdf.blocks[0].conv.weight, sdf.mlps[0].fc1.weight, sdf.mlps[0].fc2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    if adapter:
        assert loss.adapters is not None and loss.adapters[0].weight.grad is not None


def test_student_gradient_flows_through_branches() -> None:
    torch.manual_seed(0)
    loss = SDFLoss(student_channels=8, teacher_channels=8, num_levels=1, direct=0.0, **SMALL)
    s = _randn(1, 8, 4, 4, seed=1).requires_grad_(True)
    loss([s], [_randn(1, 8, 4, 4, seed=2)]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- (e) high-res teacher


def test_high_resolution_teacher_equals_pre_resized() -> None:
    torch.manual_seed(0)
    loss = SDFLoss(student_channels=8, teacher_channels=8, num_levels=2, **SMALL)
    s = [_randn(2, 8, 6, 5, seed=1), _randn(2, 8, 3, 3, seed=2)]
    t_big = [_randn(2, 8, 12, 10, seed=3), _randn(2, 8, 6, 6, seed=4)]
    t_small = [F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False) for t, x in zip(t_big, s)]
    torch.testing.assert_close(loss(s, t_big), loss(s, t_small))


def test_mismatched_batch_raises() -> None:
    loss = SDFLoss(student_channels=8, teacher_channels=8, num_levels=1, **SMALL)
    with pytest.raises(ValueError, match="kd.sdf"):
        loss([_randn(2, 8, 4, 4)], [_randn(3, 8, 4, 4)])
    with pytest.raises(ValueError, match="levels"):
        loss([_randn(2, 8, 4, 4)], [])


# ----------------------------------------------------------------------------- (f) validation


@pytest.mark.parametrize("dilations", [[], (), [0], [1, -2], [64], [1.5], [True], "123", 2, None])
def test_bad_dilations_raise(dilations: object) -> None:
    with pytest.raises(ConfigError, match=r"kd\.sdf\.params\.dilations.*e\.g\. \[1, 2, 3\]"):
        SDFBranches(8, dilations=dilations)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"kd\.sdf\.params\.dilations"):
        SDFLoss(student_channels=8, teacher_channels=8, num_levels=1, dilations=dilations)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(embed=0), "embed"),
        (dict(pool=0), "pool"),
        (dict(hidden_ratio=0), "hidden_ratio"),
        (dict(direct=-1.0), "direct"),
        (dict(shared="yes"), "shared"),
        (dict(dilatons=[1, 2]), "dilatons"),
        (dict(target="online"), "target"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum="0.9"), "momentum"),
    ],
)
def test_bad_params_raise(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"kd\.sdf\.params\.{field}") as info:
        SDFLoss(student_channels=8, teacher_channels=8, num_levels=1, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_channel_mismatch_without_adapter_raises() -> None:
    with pytest.raises(ConfigError) as info:
        SDFLoss(student_channels=6, teacher_channels=8, num_levels=1)
    assert str(info.value) == ("kd.sdf: student features have 6 channels, the teacher's 8; set `adapter: true` to learn "
                               "a 1x1 conv per level")  # the message every adapter check gives (kd/adapters.py)


# ----------------------------------------------------------------------------- (g) shapes


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("hw", [(5, 7), (1, 1), (8, 8)])
def test_branches_output_shape(shared: bool, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    module = SDFBranches(6, dilations=(1, 2, 3), shared=shared, embed=5, pool=4, hidden_ratio=4)
    out = module(_randn(1, 6, *hw))
    assert out.shape == (1, 3 * 5)
    assert torch.isfinite(out).all()
    for z in module.branch_maps(_randn(2, 6, *hw)):
        assert z.shape == (2, 6, *hw)


def test_batch_size_one_on_1x1_maps_is_zero_for_the_same_map_and_teaches_otherwise() -> None:
    """One image, a 1x1 student map and a 2x2 teacher map (resized to 1x1): a teacher that is the
    student's map gives 0 (SDF and direct terms alike); another one a positive loss whose gradient
    reaches the student."""
    loss = SDFLoss(student_channels=4, teacher_channels=4, num_levels=1, **SMALL)
    s = _randn(1, 4, 1, 1, seed=1).requires_grad_(True)
    same = s.detach().expand(1, 4, 2, 2)  # bilinear down to 1x1: the student's values
    assert loss([s], [same]).item() == pytest.approx(0.0, abs=1e-7)
    value = loss([s], [_randn(1, 4, 2, 2, seed=2)])
    value.backward()
    assert value.item() > 0 and s.grad is not None and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- (h) target readings (issue 24.3)

QUICK_LR, QUICK_WD = 0.002, 1e-4  # kdsweep/presets.py: the quick preset's AdamW


def _c5_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """C5-like student and teacher maps: 8 x 512 x 4 x 4, post-ReLU (non-negative) activations."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 512, 4, 4, generator=g).relu(), 1.5 * torch.randn(8, 512, 4, 4, generator=g).relu()


def _train_alone(target: str, steps: int = 400, train_student: bool = True) -> list[float]:
    """The term in a plain loop (forward, backward, AdamW step) at the quick preset's lr. AdamW
    trains the term's own trainable parameters (none for ``frozen``) and, with ``train_student``,
    the student map itself (an ``nn.Parameter``), so every reading really optimises something."""
    torch.manual_seed(0)
    term = SDFLoss(student_channels=512, teacher_channels=512, num_levels=1, target=target, embed=64)
    s0, t = _c5_maps()
    s = torch.nn.Parameter(s0.clone(), requires_grad=train_student)
    params = [p for p in term.parameters() if p.requires_grad] + ([s] if train_student else [])
    opt = torch.optim.AdamW(params, lr=QUICK_LR, weight_decay=QUICK_WD)
    losses = []
    for _ in range(steps):
        loss = term([s], [t])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_the_default_target_stays_bounded_and_the_bare_one_runs_away_under_adamw() -> None:
    """AdamW for 400 steps on the student's C5 map and the term's own trainable parameters: the
    default term stays within 10x of its first value and falls (0.060 -> 0.012: the student
    learns the target), the ``bare`` reading (one trained module making prediction and target)
    grows > 1e3x (peak 997, 1.7e4x its first 0.060, before it collapses to 1e-7; with the student
    map fixed it reaches 7e9)."""
    default = _train_alone("frozen")
    assert all(math.isfinite(v) and v <= 10 * default[0] for v in default)
    assert default[-1] < default[0]  # the loop does optimise: the student moves towards the target
    bare = _train_alone("bare")
    assert max(bare) > 1e3 * bare[0]


def test_the_default_keeps_a_student_gradient_comparable_to_an_l2_on_c5() -> None:
    """The default's gradient on the student's C5 is within 10x of an unweighted L2's (3.1x smaller
    with these maps and the default embed 256) and is the same after the term has been "trained"
    (nothing in it trains): no collapse."""
    torch.manual_seed(0)
    term = SDFLoss(student_channels=512, teacher_channels=512, num_levels=1)
    assert term.target == "frozen" and not [p for p in term.parameters() if p.requires_grad]
    s, t = _c5_maps()
    s = s.requires_grad_(True)
    (grad_sdf,) = torch.autograd.grad(term([s], [t]), s)
    (grad_l2,) = torch.autograd.grad(F.mse_loss(s, t), s)
    ratio = grad_l2.norm() / grad_sdf.norm()
    assert 1.0 < ratio < 10.0


def _optimized(term: torch.nn.Module) -> set[int]:
    """Ids of the tensors in the main optimizer that :func:`build_optimization` builds for a
    trainable module holding ``term`` next to a stand-in student layer (quick-preset AdamW)."""
    trainable = torch.nn.ModuleDict({"student": torch.nn.Linear(2, 2), "term": term})
    cfg = TrainConfig(optimizer="adamw", lr=QUICK_LR, weight_decay=QUICK_WD)
    optimization = build_optimization(trainable, trainable, cfg, torch.device("cpu"), steps_per_epoch=4)
    assert not optimization.term_optimizers
    return {id(p) for g in optimization.optimizer.param_groups for p in g["params"]} - {
        id(p) for p in trainable["student"].parameters()}


def test_gradients_reach_the_student_and_never_the_target_copy() -> None:
    """``frozen``: the student gets a gradient, the module none (parameters that need no gradient,
    not buffers, so DDP does not re-broadcast them every step; none reaches an optimizer built by
    ``build_optimization``). ``ema``: the student and the online module get gradients; the EMA copy
    (parameters needing no gradient, out of the optimizer) gets none, and takes exactly one EMA
    step per training forward (none in eval)."""
    torch.manual_seed(0)
    s, t = _randn(2, 8, 5, 5, seed=1).requires_grad_(True), _randn(2, 8, 5, 5, seed=2).requires_grad_(True)
    frozen = SDFLoss(student_channels=8, teacher_channels=8, num_levels=1, **SMALL)
    frozen([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert list(frozen.parameters()) and not [p for p in frozen.parameters() if p.requires_grad]
    assert all(p.grad is None for p in frozen.parameters()) and not list(frozen.buffers())
    assert "branches.0.mlps.0.fc2.weight" in frozen.state_dict()
    assert not _optimized(frozen)

    s.grad = None
    ema = SDFLoss(student_channels=8, teacher_channels=8, num_levels=1, target="ema", momentum=0.9, **SMALL)
    assert ema.target_branches is not None and not list(ema.target_branches.buffers())
    assert not [p for p in ema.target_branches.parameters() if p.requires_grad]
    assert {f"target_branches.{k}" for k, _ in ema.branches.named_parameters()} <= set(ema.state_dict())
    optimized = _optimized(ema)
    assert {id(p) for p in ema.branches.parameters()} <= optimized
    assert not optimized & {id(p) for p in ema.target_branches.parameters()}
    opt = torch.optim.SGD([p for p in ema.parameters() if p.requires_grad], lr=0.5)
    ema([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    online = dict(ema.branches.named_parameters())
    assert all(p.grad is not None for p in online.values())
    assert all(p.grad is None and not p.requires_grad for p in ema.target_branches.parameters())
    before = {k: ema.target_branches.get_parameter(k).clone() for k in online}
    opt.step()
    ema([s], [t])  # one training forward: theta' <- 0.9 theta' + 0.1 theta
    for k, p in online.items():
        torch.testing.assert_close(ema.target_branches.get_parameter(k), 0.9 * before[k] + 0.1 * p.detach())
    moved = {k: ema.target_branches.get_parameter(k).clone() for k in online}
    ema.eval()
    ema([s], [t])
    assert all(torch.equal(ema.target_branches.get_parameter(k), moved[k]) for k in online)
