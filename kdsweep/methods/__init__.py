"""Feature-distillation losses: a plain registry of KD-term builders.

``LOSSES[name]`` builds a KD term module with one signature::

    builder(*, student_channels, teacher_channels, num_levels, adapter=False, **params) -> nn.Module

whose ``forward(student_levels, teacher_levels)`` returns the (unweighted) term. A builder that
also takes ``student=`` / ``teacher=`` gets the two detectors (to size heads or embeddings).
A module with ``uses_context = True`` is a *context term*: its ``forward(ctx)`` gets the step's
:class:`~kdsweep.kd.step.KDContext` (proposals, head outputs, targets, backbone embeddings) and
returns a scalar or a dict of named scalar parts. Adding a loss means adding its file and one
line here; nothing registers itself on import.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from torch import nn

from kdsweep.config import ConfigError, KDTermConfig
from kdsweep.kd.feature import l1_feature_loss, l2_feature_loss
from kdsweep.methods.mimic import build_mimic, build_mimic_full, build_mimic_head, build_mimic_logits
from kdsweep.methods.mimicdet.kd import build_mimicdet_teacher
from kdsweep.methods.scalekd.terms import build_csa, build_sdf
from kdsweep.methods.ssim import SSIMLoss, ssim_feature_loss
from kdsweep.kd.term import FeatureTerm

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
    "sdf": build_sdf,
    "csa": build_csa,
    "mimic": build_mimic,
    "mimic_full": build_mimic_full,
    "mimic_logits": build_mimic_logits,
    "mimic_head": build_mimic_head,
    "mimicdet_teacher": build_mimicdet_teacher,
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
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
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
    models = {}
    accepted = inspect.signature(builder).parameters
    for key, model in (("student", student), ("teacher", teacher)):
        if key in accepted:
            models[key] = model
    return builder(
        student_channels=student_channels,
        teacher_channels=teacher_channels,
        num_levels=num_levels,
        adapter=cfg.adapter,
        **models,
        **dict(cfg.params),
    )
