"""ScaleKD scale-decoupled feature (SDF) distillation.

A multi-branch module of dilated residual bottlenecks (one set of weights shared by all branches,
one dilation rate per branch) followed by a "flatten MLP" per branch; the flattened branch
outputs are concatenated and a single L2 loss matches the student's concatenation to the
teacher's. The same module is applied to the teacher and to the student embedding; by default
it is a fixed (untrained) module, since a module trained by this loss alone runs away or collapses
(``target`` in :class:`SDFLoss`, issue 24 point 3).

The paper's sentences this follows (seed 000, in translation): "we only keep one set of weights
for the three branches" (the dilated convs: ``shared``, default true); "for each branch we use a
flatten layer, i.e. a multi-layer perceptron, and concatenate the three flatten layers" (one MLP
per branch: ``shared_mlp``, default false); "a single L2 loss (L_feat) minimises the distance of
this concatenated flatten layer between teacher and student" (nothing else: ``direct``, a plain
L2 on the embedding added to it, defaults to 0).

Reference:
    Zhu et al., "ScaleKD: Distilling Scale-Aware Knowledge in Small Object Detector", CVPR 2023
    (Sec. "scale-decoupled feature distillation"; shared vs separate branch weights give equal AP,
    41.6 / APs 24.8 vs 24.9, at much lower memory). The paper gives no layer sizes: the bottleneck
    reduction, the pooled grid of the flatten MLP and its width are parameters here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsweep.config import ConfigError
from kdsweep.kd.adapters import check_widths, level_adapters
from kdsweep.kd.term import reject_unknown

__all__ = ["SDFBranches", "SDFLoss"]

_MAX_DILATION = 64
TARGETS = ("frozen", "ema", "bare")
"""``target`` readings of "the same module is applied to teacher and student" (see :class:`SDFLoss`)."""


def _fix_params(module: nn.Module) -> nn.Module:
    """Take every parameter of ``module`` out of training, in place: ``requires_grad_(False)``; return it.

    They stay *parameters* (not buffers), so the state-dict keys, ``.to()`` and checkpoints are as
    before, the optimizer never sees them (:func:`kdsweep.train.optim.build_optimization` keeps only
    parameters that require a gradient), and DDP broadcasts them once, when it wraps the model, and
    leaves them out of its gradient reduction. Buffers, by contrast, are re-broadcast from rank 0 on
    every forward (``broadcast_buffers=True``, as Ray's ``prepare_model`` wraps): about 100 MB per
    step for the paper's C5 (2048 channels, three flatten MLPs). Nothing in kdsweep sets
    ``requires_grad`` back to True (the backbone freeze only drops the body's gradients).
    """
    module.requires_grad_(False)
    return module


def _check_sdf_params(
    dilations: Any, shared: Any, embed: Any, pool: Any, hidden_ratio: Any, direct: Any = 0.0, shared_mlp: Any = False,
    target: Any = "frozen", momentum: Any = 0.99,
) -> tuple[int, ...]:
    """Validate the SDF hyper-parameters (one-line :class:`ConfigError`); return the dilations."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if (
        isinstance(dilations, (str, bytes))
        or not isinstance(dilations, Sequence)
        or len(dilations) == 0
        or not all(is_int(d) and 1 <= d < _MAX_DILATION for d in dilations)
    ):
        raise ConfigError(
            f"kd.sdf.params.dilations: must be a non-empty list of ints in [1, {_MAX_DILATION - 1}], "
            f"got {dilations!r}; e.g. [1, 2, 3]"
        )
    if not isinstance(shared, bool):
        raise ConfigError(f"kd.sdf.params.shared: must be true or false, got {shared!r}; e.g. true")
    if not isinstance(shared_mlp, bool):
        raise ConfigError(f"kd.sdf.params.shared_mlp: must be true or false, got {shared_mlp!r}; e.g. false")
    for name, value, example in (("embed", embed, 256), ("pool", pool, 4), ("hidden_ratio", hidden_ratio, 4)):
        if not is_int(value) or value < 1:
            raise ConfigError(f"kd.sdf.params.{name}: must be an int >= 1, got {value!r}; e.g. {example}")
    if isinstance(direct, bool) or not isinstance(direct, (int, float)) or not math.isfinite(direct) or direct < 0:
        raise ConfigError(f"kd.sdf.params.direct: must be a finite number >= 0, got {direct!r}; e.g. 0 (the paper's)")
    if target not in TARGETS:
        raise ConfigError(f"kd.sdf.params.target '{target}' is unknown; use frozen (default), ema or bare")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ConfigError(f"kd.sdf.params.momentum: must be a number in [0, 1), got {momentum!r}; e.g. 0.99")
    return tuple(int(d) for d in dilations)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the most groups (at most 32) that keep >= 2 channels per group.

    32 groups for the usual widths (>= 64); at least two channels per group so that a ``1x1`` map
    with a batch of one still has more than one value per group (``channels >= 2`` is ensured by
    the caller).
    """
    groups = max(g for g in range(1, min(32, channels // 2) + 1) if channels % g == 0) if channels >= 2 else 1
    return nn.GroupNorm(groups, channels)


class _DilatedBottleneck(nn.Module):
    r"""Residual bottleneck ``x + B_d(x)`` whose 3x3 conv takes its dilation ``d`` per call.

    .. math::
        B_d(x) = W_3 * \operatorname{ReLU}(\operatorname{GN}_2(W_2 *_d
                 \operatorname{ReLU}(\operatorname{GN}_1(W_1 * x))))

    ``W_1``: 1x1 ``C -> max(2, C/r)``; ``W_2``: 3x3, dilation ``d``, padding ``d`` (size preserving);
    ``W_3``: 1x1 ``C/r -> C``. The 3x3 conv is applied with :func:`torch.nn.functional.conv2d`
    on the module's one weight, so one instance serves every dilation rate.
    """

    def __init__(self, channels: int, hidden_ratio: int) -> None:
        super().__init__()
        mid = max(2, channels // hidden_ratio)  # >= 2: GroupNorm needs two values on a 1x1 map
        self.reduce = nn.Conv2d(channels, mid, kernel_size=1, bias=False)
        self.norm1 = _group_norm(mid)
        self.conv = nn.Conv2d(mid, mid, kernel_size=3, bias=False)  # weight used with per-call dilation
        self.norm2 = _group_norm(mid)
        self.expand = nn.Conv2d(mid, channels, kernel_size=1)

    def forward(self, x: Tensor, dilation: int) -> Tensor:
        y = F.relu(self.norm1(self.reduce(x)))
        y = F.conv2d(y, self.conv.weight, self.conv.bias, padding=dilation, dilation=dilation)
        y = F.relu(self.norm2(y))
        return x + self.expand(y)


class _FlattenMLP(nn.Module):
    r"""Resolution-independent flatten MLP: pool to ``p x p``, flatten, two linear layers.

    Why pool: the paper flattens the branch map, which ties the MLP to one input size (and at
    COCO's 800x1333, C5 is 25x42x2048: 2.2M inputs per branch). Average pooling to a fixed
    ``p x p`` grid keeps the MLP small and any resolution valid, at a cost: a cell averages
    ``(H/p) x (W/p)`` C5 positions, so one small object's response (one C5 position: 32 px) is
    diluted by that factor, not erased (``tests/test_scalekd.py`` checks a one-position bright
    spot against pooling sizes). ``pool`` is the parameter; ``pool >= max(H, W)`` keeps every
    position.

    .. math::
        m(z) = W_b \operatorname{ReLU}(W_a \operatorname{vec}(\operatorname{AvgPool}_{p \times p}(z)))

    Shape:
        - input: ``(N, C, H, W)``, any ``H, W >= 1`` (adaptive pooling repeats values when
          ``H < p``).
        - output: ``(N, embed)``.
    """

    def __init__(self, channels: int, embed: int, pool: int) -> None:
        super().__init__()
        self.pool = pool
        self.fc1 = nn.Linear(channels * pool * pool, embed)
        self.fc2 = nn.Linear(embed, embed)

    def forward(self, z: Tensor) -> Tensor:
        z = F.adaptive_avg_pool2d(z, self.pool).flatten(1)
        return self.fc2(F.relu(self.fc1(z)))


class SDFBranches(nn.Module):
    r"""ScaleKD's scale-decoupled multi-branch module with flatten MLPs.

    Branch ``k`` (dilation ``d_k``) maps the embedding ``Z`` to

    .. math::
        b_k(Z) = m_k\bigl(Z + B_{d_k}(Z)\bigr), \qquad
        \operatorname{SDF}(Z) = [\, b_1(Z) \,\|\, \dots \,\|\, b_K(Z) \,]

    where ``B_d`` is the residual bottleneck 1x1 (``C -> max(2, C//r)``) -> GroupNorm -> ReLU -> 3x3 with
    dilation ``d`` and padding ``d`` -> GroupNorm -> ReLU -> 1x1 (``-> C``), and ``m_k`` is the
    flatten MLP (adaptive average pool to ``pool x pool``, flatten, Linear -> ``embed`` -> ReLU ->
    Linear -> ``embed``). Pooling to a fixed grid keeps the MLP small and independent of the input
    resolution.

    With ``shared=True`` (the paper's choice) every branch uses the same bottleneck weights
    (applied with its own dilation through :func:`torch.nn.functional.conv2d`); with
    ``shared=False`` each dilation has its own bottleneck. Each branch has its own flatten MLP
    ("for each branch we use a flatten layer", the paper); ``shared_mlp=True`` gives them one.

    Normalisation is GroupNorm (up to 32 groups of at least two channels): per-sample statistics, so a batch of one
    and the teacher/student passes behave identically in train and eval mode (BatchNorm would mix
    the two passes' statistics through its running averages and fail on ``1x1`` maps with
    ``N = 1``).

    Args:
        channels: embedding channels ``C``.
        dilations: dilation rate of each branch (non-empty, ints in ``[1, 63]``).
        shared: one set of bottleneck weights for all branches (default) or one per branch.
        shared_mlp: one flatten MLP for all branches, or one per branch (default, the paper's).
        embed: width of the flatten MLP's hidden and output layers.
        pool: side of the adaptive-average-pool grid before flattening.
        hidden_ratio: bottleneck reduction ``r`` (``max(2, C // r)`` hidden channels).

    Raises:
        ConfigError: invalid ``dilations``, ``embed``, ``pool`` or ``hidden_ratio``.

    Shape:
        - input: ``(N, C, H, W)``, any ``H, W >= 1``.
        - output: ``(N, len(dilations) * embed)``.

    Reference:
        Zhu et al., "ScaleKD: Distilling Scale-Aware Knowledge in Small Object Detector", CVPR 2023.
    """

    def __init__(
        self,
        channels: int,
        *,
        dilations: Sequence[int] = (1, 2, 3),
        shared: bool = True,
        embed: int = 256,
        pool: int = 4,
        hidden_ratio: int = 4,
        shared_mlp: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"kd.sdf: channels must be an int >= 1, got {channels!r}")
        self.dilations = _check_sdf_params(dilations, shared, embed, pool, hidden_ratio, shared_mlp=shared_mlp)
        self.channels = channels
        self.shared = shared
        self.shared_mlp = shared_mlp
        self.embed = embed
        branches = len(self.dilations)
        self.blocks = nn.ModuleList(_DilatedBottleneck(channels, hidden_ratio) for _ in range(1 if shared else branches))
        self.mlps = nn.ModuleList(_FlattenMLP(channels, embed, pool) for _ in range(1 if shared_mlp else branches))

    def branch_maps(self, x: Tensor) -> list[Tensor]:
        """Per-branch residual outputs ``x + B_d(x)`` (before the MLP), each ``(N, C, H, W)``."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"kd.sdf: expected (N, {self.channels}, H, W) features, got {tuple(x.shape)}")
        return [self.blocks[0 if self.shared else k](x, d) for k, d in enumerate(self.dilations)]

    def forward(self, x: Tensor) -> Tensor:
        maps = self.branch_maps(x)
        return torch.cat([self.mlps[0 if self.shared_mlp else k](z) for k, z in enumerate(maps)], dim=1)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, dilations={list(self.dilations)}, shared={self.shared}, "
                f"shared_mlp={self.shared_mlp}, embed={self.embed}")


class SDFLoss(nn.Module):
    r"""ScaleKD SDF distillation term, summed over the matched levels.

    For level ``l`` with student map ``s_l``, teacher map ``t_l`` and this level's module
    ``\operatorname{SDF}_l`` (:class:`SDFBranches`):

    .. math::
        \hat t_l &= \operatorname{sg}\bigl(\operatorname{resize}(t_l)\bigr), \qquad
        \hat s_l = A_l(s_l) \\
        L &= \sum_l \Bigl[ \operatorname{MSE}\bigl(\operatorname{SDF}_l(\hat s_l),
              \operatorname{sg}(\operatorname{SDF}_l(\hat t_l))\bigr)
              + \lambda_{\text{direct}} \operatorname{MSE}(\hat s_l, \hat t_l) \Bigr]

    ``MSE`` is the mean over all elements (``N * K * embed`` for the first term, ``N*C*H*W`` for
    the second), so levels of different sizes weigh the same; levels are summed, as in
    :class:`~kdsweep.kd.term.FeatureTerm`.

    What is trained, and by what (``target``; issue 24, point 3):

    - The *same* :class:`SDFBranches` is applied to the student and the teacher embedding (the
      paper's "same module"); one module per level (a ``ModuleList``), since levels differ in
      scale statistics. With ``num_levels=1`` this is the paper's setting (the last backbone
      stage). The write-up says nothing more: not whether, nor by what, the module is trained.
    - ``target: frozen`` (default, our reading): the module keeps its (seeded) initial weights,
      held as parameters that need no gradient (``requires_grad=False``: out of the optimizer and
      of DDP's reduction, broadcast once at wrap time, not every step as buffers would be), and
      both sides go through it: ``L = MSE(SDF_0(s), sg(SDF_0(t)))``. Only
      the student (and the adapter, and ``direct``) learn. Why: the module's only training signal
      would be this loss, which it can lower by ignoring its input, and the main optimizer is
      AdamW (lr 0.002 on the quick preset), whose steps do not shrink with the 0.01 weight. On
      C5-like maps (8 x 512 x 4 x 4), trained alone for 400 steps: ``bare`` (module trained
      through the student side, target from the same weights under ``no_grad``) runs away, 0.059
      -> 2.5e10; ``ema`` (target from an EMA copy, momentum 0.99 or 0.999) is bounded but the
      online module collapses: its ReLUs die and the student's gradient is exactly 0 by step
      200; L2-normalised embeddings collapse the same way (gradient / 2,000 to / 5,700). The
      frozen module stays at 0.059 with a student gradient 3.1x smaller than that of an
      unweighted L2 on the same maps (0.0027 vs 0.0084 in norm), constant over training. With
      the student map trained by the same AdamW (embed 64, as in ``tests/test_sdf.py``): the
      frozen term falls 0.060 -> 0.012 (the student learns the target); ``bare`` peaks at 997
      (1.7e4x) by chasing its own target, then collapses to 1e-7.
    - ``target: ema``: the student side goes through the trained module, the target through an
      exponential moving average of it (``momentum``, BYOL/MoCo-style) updated in :meth:`forward`
      in training mode, *before* the target is computed. The copy is held, like the ``frozen``
      module, as parameters with ``requires_grad=False``: never in the optimizer (nothing steps it
      but the EMA update, which nothing undoes), and not re-broadcast by DDP on every step as
      buffers would be; it needs no broadcast: every rank starts from the same copy (DDP syncs it
      at wrap time) and applies the same deterministic update to the same (all-reduced) weights.
    - ``target: bare``: the earlier behaviour, kept to show its instability: one trained module
      makes the prediction and, under ``no_grad``, the target.
    - In every reading the teacher pass runs on the detached teacher map under ``no_grad``, so no
      gradient reaches the teacher or a target copy.
    - Collapse: with a trained module (``ema``, ``bare``) the module can reach zero loss by
      mapping everything to a constant, after which the term carries no signal. ``direct > 0``
      adds a plain L2 between the adapted student and teacher embeddings, an anchor that is *not*
      in the paper: with it, an "sdf" row is L2 on C5 plus SDF (the ScaleKD ablation's "l2 on C5"
      row is that anchor alone, for comparison).
    - High-resolution teacher: when the teacher map's spatial size differs from the student's
      (ScaleKD feeds the teacher a larger image), it is resized to the student's ``H x W`` with
      bilinear interpolation (``align_corners=False``) before both terms.

    Args:
        student_channels, teacher_channels: feature channels of the two detectors.
        num_levels: number of matched levels ``forward`` receives.
        adapter: learn one 1x1 conv per level; required when the channels differ.
        dilations, shared, shared_mlp, embed, pool: see :class:`SDFBranches`.
        hidden_ratio: bottleneck reduction ``r`` of the branches.
        direct: weight of a plain L2 anchor between adapted student and teacher maps (>= 0;
            default 0, the paper's bare SDF term).
        target: ``frozen`` (default), ``ema`` or ``bare``, see above.
        momentum: of the ``ema`` target copy, in ``[0, 1)`` (default 0.99).

    Raises:
        ConfigError: invalid or unknown parameters; channel mismatch without ``adapter``.

    Shape:
        - student: ``num_levels`` tensors ``(N, C_s, H_l, W_l)``.
        - teacher: ``num_levels`` tensors ``(N, C_t, H'_l, W'_l)`` (any spatial size).
        - output: ``()``.

    Reference:
        Zhu et al., "ScaleKD: Distilling Scale-Aware Knowledge in Small Object Detector", CVPR 2023.
    """

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        adapter: bool | str = False,
        dilations: Sequence[int] = (1, 2, 3),
        shared: bool = True,
        embed: int = 256,
        pool: int = 4,
        hidden_ratio: int = 4,
        direct: float = 0.0,
        shared_mlp: bool = False,
        target: str = "frozen",
        momentum: float = 0.99,
        **unknown: Any,
    ) -> None:
        super().__init__()
        reject_unknown("sdf", unknown, ("adapter", "dilations", "shared", "shared_mlp", "embed", "pool", "hidden_ratio",
                                        "direct", "target", "momentum"))
        check_widths("sdf", student_channels, teacher_channels, num_levels, adapter)
        _check_sdf_params(dilations, shared, embed, pool, hidden_ratio, direct, shared_mlp, target, momentum)
        self.num_levels = num_levels
        self.direct = float(direct)
        self.target, self.momentum = target, float(momentum)
        self.adapters = level_adapters("sdf", student_channels, teacher_channels, num_levels, adapter)
        self.branches = nn.ModuleList(
            SDFBranches(
                teacher_channels,
                dilations=dilations,
                shared=shared,
                embed=embed,
                pool=pool,
                hidden_ratio=hidden_ratio,
                shared_mlp=shared_mlp,
            )
            for _ in range(num_levels)
        )
        if target == "frozen":  # one fixed module: parameters that need no gradient, invisible to the optimizer
            _fix_params(self.branches)
        # the EMA target copy: parameters of the same names as the online module's, needing no gradient
        self.target_branches = _fix_params(copy.deepcopy(self.branches)) if target == "ema" else None

    @torch.no_grad()
    def update_target(self) -> None:
        """EMA step of the target copy: ``theta' <- m theta' + (1 - m) theta`` (``target: ema`` only)."""
        if self.target_branches is None:
            return
        for name, param in self.branches.named_parameters():
            self.target_branches.get_parameter(name).lerp_(param.detach(), 1.0 - self.momentum)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        return self.compare(student, teacher)

    def compare(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        """The loss of matched level lists (see the class docstring for shapes).

        In training mode with ``target: ema`` the target copy takes its EMA step first.
        """
        if self.training:
            self.update_target()
        if len(student) != self.num_levels or len(teacher) != self.num_levels:
            raise ValueError(
                f"kd.sdf: expected {self.num_levels} levels, got {len(student)} student and "
                f"{len(teacher)} teacher feature maps"
            )
        total: Tensor | None = None
        for level, (s, t) in enumerate(zip(student, teacher)):
            if self.adapters is not None:
                s = self.adapters[level](s)
            t = t.detach().to(s.dtype)
            if t.shape[-2:] != s.shape[-2:]:
                t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
            if s.shape != t.shape:
                raise ValueError(
                    f"kd.sdf: level {level}: student {tuple(s.shape)} vs teacher {tuple(t.shape)} "
                    "(after the adapter and resizing); batch and channels must match"
                )
            sdf = self.branches[level]
            target_sdf = self.target_branches[level] if self.target_branches is not None else sdf
            with torch.no_grad():  # target only: no graph through the teacher pass
                target = target_sdf(t)
            loss = F.mse_loss(sdf(s), target)
            if self.direct:
                loss = loss + self.direct * F.mse_loss(s, t)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}, direct={self.direct}, target={self.target}, momentum={self.momentum}"
