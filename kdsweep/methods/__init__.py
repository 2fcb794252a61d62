"""The registry of KD terms: one line per method, a plain dict from a config's ``loss`` name to
its builder. Nothing registers itself on import.

Every builder has the one signature ``builder(spec: TermSpec) -> KDTerm`` (the contract:
:mod:`kdsweep.kd.term`). Adding a method means adding its place under ``kdsweep/methods/``, one
line here, a search-space YAML and a test.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdsweep.config import ConfigError, KDTermConfig
from kdsweep.kd.feature import feature_term, l1_feature_loss, l2_feature_loss
from kdsweep.kd.term import KDTerm, TermSpec
from kdsweep.methods.crosskd import build_crosskd
from kdsweep.methods.cwd import cwd_feature_loss
from kdsweep.methods.fgd import build_fgd
from kdsweep.methods.mgd import build_mgd
from kdsweep.methods.mimic import build_mimic, build_mimic_full, build_mimic_head, build_mimic_logits
from kdsweep.methods.mimicdet.kd import build_mimicdet_teacher
from kdsweep.methods.pkd import pkd_feature_loss
from kdsweep.methods.scalekd.terms import build_csa, build_sdf
from kdsweep.methods.ssim import ssim_feature_loss

__all__ = ["TERMS", "build_term", "term_names_known"]

TERMS: dict[str, Callable[[TermSpec], KDTerm]] = {
    "l1": feature_term(l1_feature_loss),  # the Lp baselines (every paper)
    "l2": feature_term(l2_feature_loss),
    "ssim": feature_term(ssim_feature_loss),  # de Rijk & Schneider 2022
    "sdf": build_sdf,  # ScaleKD (Zhu et al. 2023)
    "csa": build_csa,
    "mimic": build_mimic,  # Li, Jin & Yan 2017
    "mimic_full": build_mimic_full,
    "mimic_logits": build_mimic_logits,
    "mimic_head": build_mimic_head,
    "mimicdet_teacher": build_mimicdet_teacher,  # MimicDet (Lu et al. 2020) with a separate teacher
    "pkd": feature_term(pkd_feature_loss),  # Cao et al. 2022
    "cwd": feature_term(cwd_feature_loss),  # Shu et al. 2021
    "mgd": build_mgd,  # Yang et al. 2022 (ECCV)
    "fgd": build_fgd,  # Yang et al. 2022 (CVPR)
    "crosskd": build_crosskd,  # Wang et al. 2024
}


def term_names_known() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(TERMS)


def build_term(
    cfg: KDTermConfig,
    *,
    name: str,
    levels: tuple[str, ...],
    student: nn.Module,
    teacher: nn.Module,
    index: int | None = None,
) -> KDTerm:
    """The KD term of one ``kd`` entry of the config (its ``weight`` is applied by the Distiller).

    Args:
        cfg: the entry (``loss``, ``adapter``, ``params``); ``adapter: auto`` is resolved by the
            builder against the widths it compares (:func:`kdsweep.kd.adapters.resolve_adapter`).
        name: its name in the step (``ssim``, ``ssim_1`` when repeated); levels: what it compares.
        student, teacher: the built detectors.
        index: position of the entry in ``kd``, for the error message.

    Raises:
        ConfigError: unknown loss name (``kd[0].loss 'ssimm' is unknown; known: l1, l2, ssim``),
            or what the builder rejects (unknown params, channel mismatch without adapter).
    """
    builder = TERMS.get(cfg.loss)
    if builder is None:
        where = "kd" if index is None else f"kd[{index}]"
        raise ConfigError(f"{where}.loss '{cfg.loss}' is unknown; known: {', '.join(term_names_known())}")
    spec = TermSpec(name=name, loss=cfg.loss, student=student, teacher=teacher,
                    student_channels=student.backbone.out_channels, teacher_channels=teacher.backbone.out_channels,
                    levels=tuple(levels), adapter=cfg.adapter, params=dict(cfg.params))
    return builder(spec)
