"""A feature-distillation term: one per-pair loss summed over matched FPN levels.

Reference:
    de Rijk & Schneider, "Structural Knowledge Distillation for Object Detection", NeurIPS 2022:
    the loss is applied to every FPN level, each level averaged over its ``C*H*W`` values (and the
    batch), the levels summed; an optional 1x1 adapter maps student channels to the teacher's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdsweep.config import ConfigError

__all__ = ["FeatureTerm", "keyword_params", "reject_unknown"]


def keyword_params(fn: Callable[..., Tensor]) -> list[str]:
    """Names of ``fn``'s keyword-only parameters: what a term's ``params`` may set."""
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def reject_unknown(name: str, params: Mapping[str, Any] | Sequence[str], known: Sequence[str]) -> None:
    """Raise ``ConfigError`` naming the first key of ``params`` not in ``known`` (listed in order).

    Every KD term builder uses it, so an unknown ``kd.<name>.params.<key>`` reads the same for all.
    """
    for key in params:
        if key not in known:
            raise ConfigError(f"kd.{name}.params.{key} is unknown; known: {', '.join(known) if known else '(none)'}")


class FeatureTerm(nn.Module):
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

    Shape:
        - student, teacher: sequences of ``num_levels`` tensors; level ``l`` is
          ``(N, C_s, H_l, W_l)`` and ``(N, C_t, H_l, W_l)`` (the caller aligns resolution).
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
        adapter: bool = False,
        name: str | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "loss")
        self.params = dict(params)
        self.num_levels = num_levels
        self._check(student_channels, teacher_channels, num_levels, adapter)
        self.adapters = (
            nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, kernel_size=1) for _ in range(num_levels))
            if adapter
            else None
        )

    def _check(self, student_channels: int, teacher_channels: int, num_levels: int, adapter: bool) -> None:
        reject_unknown(self.name, self.params, keyword_params(self.fn))
        if num_levels < 1 or student_channels < 1 or teacher_channels < 1:
            raise ConfigError(
                f"kd.{self.name}: num_levels, student_channels and teacher_channels must be >= 1, got "
                f"{num_levels}, {student_channels}, {teacher_channels}"
            )
        if student_channels != teacher_channels and not adapter:
            raise ConfigError(
                f"kd.{self.name}: student features have {student_channels} channels, the teacher's "
                f"{teacher_channels}; set `adapter: true` to learn a 1x1 conv per level"
            )
        try:  # bad values (e.g. an even window) fail now, not in the first training step
            with torch.no_grad():
                probe = torch.zeros(1, 1, 1, 1, device="cpu")  # a check of the values, on any default device
                self.fn(probe, probe, **self.params)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"kd.{self.name}.params: {exc}") from None

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
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
