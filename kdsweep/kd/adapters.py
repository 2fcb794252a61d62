"""Learned student -> teacher channel adapters, one per matched FPN level.

Every method that compares maps of different widths uses the same 1x1 convolution per level
(de Rijk 2022's optional adapter, Li 2017's regression layer ``r``, ScaleKD's alignment), and the
same check: different widths need ``adapter: true``.
"""

from __future__ import annotations

from torch import nn

from kdsweep.config import ConfigError

__all__ = ["check_widths", "level_adapters", "resolve_adapter"]


def resolve_adapter(adapter: bool | str, student_channels: int, teacher_channels: int) -> bool:
    """The config's ``adapter``: true, false, or ``"auto"``: exactly when the widths the term
    compares differ (as PKD's, CWD's, MGD's and FGD's code adds its ``align``)."""
    return student_channels != teacher_channels if adapter == "auto" else bool(adapter)


def check_widths(name: str, student_channels: int, teacher_channels: int, num_levels: int,
                 adapted: bool | str) -> None:
    """Raise a one-line ConfigError for impossible widths or level counts, or for different
    widths that nothing maps (``adapted``: an adapter or another channel map is configured;
    ``"auto"`` always maps them)."""
    if min(num_levels, student_channels, teacher_channels) < 1:
        raise ConfigError(
            f"kd.{name}: num_levels, student_channels and teacher_channels must be >= 1, got "
            f"{num_levels}, {student_channels}, {teacher_channels}"
        )
    if student_channels != teacher_channels and not adapted:
        raise ConfigError(
            f"kd.{name}: student features have {student_channels} channels, the teacher's "
            f"{teacher_channels}; set `adapter: true` to learn a 1x1 conv per level"
        )


def level_adapters(name: str, student_channels: int, teacher_channels: int, num_levels: int,
                   adapter: bool | str) -> nn.ModuleList | None:
    """``num_levels`` 1x1 convolutions from the student's width to the teacher's (``adapter``, see
    :func:`resolve_adapter`), or None; widths checked by :func:`check_widths`.

    Shape:
        - each: ``(N, C_s, H, W) -> (N, C_t, H, W)``.
    """
    check_widths(name, student_channels, teacher_channels, num_levels, adapter)
    if not resolve_adapter(adapter, student_channels, teacher_channels):
        return None
    return nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, kernel_size=1) for _ in range(num_levels))
