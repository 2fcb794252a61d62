"""Feature terms: one per-pair loss summed over matched FPN levels, and the Lp baselines.

Reference:
    de Rijk & Schneider, "Structural Knowledge Distillation for Object Detection", NeurIPS 2022.
    The paper compares its SSIM loss with these Lp feature losses on every FPN level (COCO,
    RetinaNet R50 student: L1 38.7, L2 36.8, SSIM 40.1 AP in the seed's table; METHODS.md's
    summary says L2 39.0). The
    write-up min-max normalises the features "before any loss": ``normalize="minmax"`` gives the
    Lp losses SSIM's normalisation (:func:`~kdsweep.methods.ssim.minmax_normalize`), so that an
    ablation's rows differ in the loss alone; the default ``None`` compares raw features (the
    usual Lp feature distillation, and ScaleKD's "l2 on C5" control).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdsweep.config import ConfigError
from kdsweep.kd.adapters import level_adapters
from kdsweep.kd.step import KDStep, body_channels
from kdsweep.kd.term import KDTerm, Need, TermSpec, keyword_params, reject_unknown
from kdsweep.models.taps import resize_teacher

__all__ = ["FeatureTerm", "feature_term", "l1_feature_loss", "l2_feature_loss"]


def _normalized(student: Tensor, teacher: Tensor, normalize: str | None, name: str) -> tuple[Tensor, Tensor]:
    """Both maps min-max normalised per sample (``normalize="minmax"``), or as they are (None)."""
    if normalize not in ("minmax", None):
        raise ValueError(f"{name}: normalize must be 'minmax' or None, got {normalize!r}")
    if normalize is None:
        return student, teacher
    # SSIM's own normalisation; imported here, as kdsweep.methods imports this module
    from kdsweep.methods.ssim import minmax_normalize

    return minmax_normalize(student), minmax_normalize(teacher.to(student.dtype))


def l2_feature_loss(student: Tensor, teacher: Tensor, *, normalize: str | None = None) -> Tensor:
    r"""Mean squared error between student and teacher features.

    .. math::
        L_2 = \frac{1}{NCHW} \sum_{n,c,h,w} (x_{nchw} - y_{nchw})^2

    Args:
        student: student features ``x``; gradients flow to it.
        teacher: teacher features ``y`` (normally detached), same shape.
        normalize: ``"minmax"``: ``x`` and ``y`` min-max normalised per sample first, as SSIM's
            inputs (de Rijk & Schneider normalise before any loss); None: raw features.

    Shape:
        - student, teacher: ``(N, C, H, W)`` (any equal shapes).
        - output: ``()``.

    Reference:
        de Rijk & Schneider, "Structural Knowledge Distillation for Object Detection", NeurIPS 2022
        (the L2 baseline).
    """
    _check_pair(student, teacher, "l2")
    student, teacher = _normalized(student, teacher, normalize, "l2")
    return F.mse_loss(student, teacher.to(student.dtype))


def l1_feature_loss(student: Tensor, teacher: Tensor, *, normalize: str | None = None) -> Tensor:
    r"""Mean absolute error between student and teacher features.

    .. math::
        L_1 = \frac{1}{NCHW} \sum_{n,c,h,w} |x_{nchw} - y_{nchw}|

    The gradient is ``sign(x - y) / (NCHW)`` (0 where ``x = y``).

    Args:
        student: student features ``x``; gradients flow to it.
        teacher: teacher features ``y`` (normally detached), same shape.
        normalize: as :func:`l2_feature_loss`.

    Shape:
        - student, teacher: ``(N, C, H, W)`` (any equal shapes).
        - output: ``()``.

    Reference:
        de Rijk & Schneider, "Structural Knowledge Distillation for Object Detection", NeurIPS 2022
        (the L1 baseline).
    """
    _check_pair(student, teacher, "l1")
    student, teacher = _normalized(student, teacher, normalize, "l1")
    return F.l1_loss(student, teacher.to(student.dtype))


def _check_pair(student: Tensor, teacher: Tensor, name: str) -> None:
    """No silent broadcasting: the caller aligns shapes (adapter, resolution) first."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student and teacher features differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )


class FeatureTerm(KDTerm):
    r"""KD term :math:`\sum_l f(A_l(s_l), \operatorname{sg}(t_l); \theta)` over matched FPN levels.

    ``f`` is a per-pair loss (e.g. :func:`~kdsweep.methods.ssim.ssim_feature_loss`) returning the
    mean over the level's ``N*C*H*W`` values (``N*C*H'*W'`` SSIM-map values), so levels of
    different sizes weigh the same; the term is the *sum* over levels. ``A_l`` is an optional 1x1
    convolution (student -> teacher channels, one per level); ``sg`` stops the gradient (the
    teacher is detached here whatever the caller passes).

    Args:
        fn: per-pair loss ``fn(student, teacher, **params) -> scalar``.
        student_channels, teacher_channels: feature channels of the two FPNs.
        num_levels: number of matched levels ``forward`` receives.
        adapter: learn one 1x1 conv per level; required when the channels differ.
        name: loss name for error messages (default ``fn.__name__``).
        **params: keyword-only parameters of ``fn`` (validated here, checked by a dry run on a
            1x1 map so that a bad value fails at build time).

    Raises:
        ConfigError: unknown or invalid ``params``; channel mismatch without ``adapter``.

    ``forward(step)`` compares ``step.aligned()`` (the teacher maps resized to the student's), or
    with ``source="body"`` the last backbone stages (C5, one "level"; the teacher's resized to the
    student's as :func:`~kdsweep.models.taps.resize_teacher` does): ScaleKD's "l2 on C5" control
    row; :meth:`compare` takes the two level lists directly.

    Shape:
        - student, teacher (of :meth:`compare`): sequences of ``num_levels`` tensors; level ``l``
          is ``(N, C_s, H_l, W_l)`` and ``(N, C_t, H_l, W_l)``.
        - output: ``()``.

    Reference:
        de Rijk & Schneider, "Structural Knowledge Distillation for Object Detection", NeurIPS 2022.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        *,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        adapter: bool | str = False,
        name: str | None = None,
        source: str = "fpn",
        **params: Any,
    ) -> None:
        super().__init__()
        self.source = source
        if source == "body":
            self.needs = frozenset({Need.BODY})
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "loss")
        self.params = dict(params)
        self.num_levels = num_levels
        reject_unknown(self.name, self.params, keyword_params(self.fn))
        self.adapters = level_adapters(self.name, student_channels, teacher_channels, num_levels, adapter)
        self._probe()

    def _probe(self) -> None:
        try:  # bad values (e.g. an even window) fail now, not in the first training step
            with torch.no_grad():
                probe = torch.zeros(1, 1, 1, 1, device="cpu")  # a check of the values, on any default device
                self.fn(probe, probe, **self.params)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"kd.{self.name}.params: {exc}") from None

    def forward(self, step: KDStep) -> Tensor:
        if self.source == "body":
            if step.student_body is None or step.teacher_out.body is None:
                raise RuntimeError(f"kd.{self.name}: the backbone embeddings were not captured")
            s = step.student_body
            return self.compare([s], [resize_teacher(step.teacher_out.body, tuple(s.shape[-2:]), step.teacher_scale)])
        return self.compare(*step.aligned())

    def compare(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        """The term of matched level lists (see the class docstring for shapes)."""
        if len(student) != self.num_levels or len(teacher) != self.num_levels:
            raise ValueError(
                f"kd.{self.name}: expected {self.num_levels} levels, got {len(student)} student and "
                f"{len(teacher)} teacher feature maps"
            )
        total = None
        for level, (s, t) in enumerate(zip(student, teacher)):
            if self.adapters is not None:
                s = self.adapters[level](s)
            t = t.detach()
            if s.shape != t.shape:
                raise ValueError(
                    f"kd.{self.name}: level {level}: student {tuple(s.shape)} vs teacher {tuple(t.shape)} "
                    "(after the adapter); align resolution and channels first"
                )
            loss = self.fn(s, t, **self.params)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}, num_levels={self.num_levels}" + (f", {params}" if params else "")


def feature_term(fn: Callable[..., Tensor]) -> Callable[[TermSpec], FeatureTerm]:
    """The registry builder of the feature term of per-pair loss ``fn`` (``l1``, ``l2``, ``ssim``)."""

    def build(spec: TermSpec) -> FeatureTerm:
        params = dict(spec.params)
        source = params.pop("source", "fpn")
        if source not in ("fpn", "body"):
            raise ConfigError(f"kd.{spec.loss}.params.source '{source}' is unknown; use fpn (the FPN levels) or body "
                              "(the last backbone stage, C5)")
        channels = (spec.student_channels, spec.teacher_channels, spec.num_levels)
        if source == "body":
            channels = (body_channels(spec.student), body_channels(spec.teacher), 1)
        return FeatureTerm(fn, student_channels=channels[0], teacher_channels=channels[1], num_levels=channels[2],
                           adapter=spec.adapter, name=spec.loss, source=source, **params)

    build.__name__ = build.__qualname__ = f"feature_term_{getattr(fn, '__name__', 'loss')}"
    return build
