"""Feature-distillation losses: a plain registry of KD-term builders.

``LOSSES[name]`` builds a KD term module with one signature::

    builder(*, student_channels, teacher_channels, num_levels, adapter=False, **params) -> nn.Module

whose ``forward(student_levels, teacher_levels)`` returns the (unweighted) term. Adding a loss
means adding its file and one line here; nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from kdsweep.config import ConfigError, KDTermConfig
from kdsweep.losses.feature import l1_feature_loss, l2_feature_loss
from kdsweep.losses.ssim import SSIMLoss, ssim_feature_loss
from kdsweep.losses.term import FeatureTerm

__all__ = [
    "LOSSES",
    "FeatureTerm",
    "SSIMLoss",
    "build_loss",
    "l1_feature_loss",
    "l2_feature_loss",
    "loss_names",
    "ssim_feature_loss",
]

LOSSES: dict[str, Callable[..., nn.Module]] = {
    "l1": partial(FeatureTerm, l1_feature_loss, name="l1"),
    "l2": partial(FeatureTerm, l2_feature_loss, name="l2"),
    "ssim": partial(FeatureTerm, ssim_feature_loss, name="ssim"),
}


def loss_names() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(LOSSES)


def build_loss(
    cfg: KDTermConfig,
    *,
    student_channels: int,
    teacher_channels: int,
    num_levels: int,
    index: int | None = None,
) -> nn.Module:
    """The KD term module for one ``kd`` entry of the config.

    Args:
        cfg: the term's config (``loss``, ``adapter``, ``params``; ``weight`` and ``levels`` are
            applied by the caller).
        student_channels, teacher_channels: FPN channels of the two detectors.
        num_levels: matched levels the term will receive.
        index: position of the entry in ``kd``, for the error message.

    Raises:
        ConfigError: unknown loss name (``kd[0].loss 'ssimm' is unknown; known: l1, l2, ssim``),
            or what the builder rejects (unknown params, channel mismatch without adapter).
    """
    builder = LOSSES.get(cfg.loss)
    if builder is None:
        where = "kd" if index is None else f"kd[{index}]"
        raise ConfigError(f"{where}.loss '{cfg.loss}' is unknown; known: {', '.join(loss_names())}")
    return builder(
        student_channels=student_channels,
        teacher_channels=teacher_channels,
        num_levels=num_levels,
        adapter=cfg.adapter,
        **dict(cfg.params),
    )
