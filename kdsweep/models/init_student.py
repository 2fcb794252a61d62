"""``train.init_student``: start the student's neck and head from the teacher's.

MGD (Yang et al., ECCV 2022) and FGD (Yang et al., CVPR 2022) both train their RetinaNet students
with ``init_student=True`` in the authors' configs: before training, the teacher checkpoint's
``neck.*`` and ``bbox_head.*`` tensors are loaded into the student (mmcv's non-strict load, which
skips a tensor whose shape differs, so only where the widths match). Here the neck is
torchvision's ``backbone.fpn.*`` and the head every state-dict entry outside ``backbone.``
(RetinaNet/FCOS ``head.*``, Faster R-CNN ``rpn.*`` and ``roi_heads.*``); the backbone body
(``backbone.body.*``) and anything else under ``backbone.`` (a cross-scale student's deconvolutions)
keep the student's own initialisation.

The worker calls :func:`maybe_init_student` once, before DDP wrapping, on every rank alike (each
rank holds the same teacher weights, so the copies agree), and not on a resume: the checkpoint
holds the trained student.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdsweep.config import ConfigError

__all__ = ["InitReport", "copy_neck_and_head", "is_neck_or_head", "maybe_init_student"]


def is_neck_or_head(name: str) -> bool:
    """True for a state-dict entry of the FPN (``backbone.fpn.*``) or a head (not under ``backbone.``)."""
    return name.startswith("backbone.fpn.") or not name.startswith("backbone.")


@dataclass(frozen=True)
class InitReport:
    """What :func:`copy_neck_and_head` did: the names it copied and the student's neck/head
    entries it left (absent in the teacher, or another shape)."""

    copied: tuple[str, ...]
    skipped: tuple[str, ...]


@torch.no_grad()
def copy_neck_and_head(student: nn.Module, teacher: nn.Module | Mapping[str, Tensor]) -> InitReport:
    """Copy every teacher neck/head tensor (parameters and buffers) whose name and shape match
    into ``student``, in place.

    Args:
        student: the student detector (not yet DDP-wrapped).
        teacher: the teacher detector or its state_dict.

    Raises:
        ConfigError: no neck/head tensor matches (e.g. FPN widths differ in every layer).
    Warns:
        UserWarning: some neck/head tensors of the student were left (e.g. a head whose
            ``num_classes`` differs); the authors' non-strict load skips them the same way.
    """
    source = teacher.state_dict() if isinstance(teacher, nn.Module) else teacher
    target = student.state_dict()
    copied: list[str] = []
    skipped: list[str] = []
    for name, value in target.items():
        if not is_neck_or_head(name):
            continue
        given = source.get(name)
        if isinstance(given, Tensor) and given.shape == value.shape:
            value.copy_(given.to(device=value.device, dtype=value.dtype))
            copied.append(name)
        else:
            skipped.append(name)
    if not copied:
        raise ConfigError("train.init_student: no teacher neck/head tensor matches the student's by name and shape "
                          "(give both the same arch and fpn_channels, or set init_student false)")
    if skipped:
        warnings.warn(f"train.init_student: copied {len(copied)} neck/head tensors from the teacher, left "
                      f"{len(skipped)} of another shape or absent (first: {skipped[0]})", stacklevel=2)
    return InitReport(tuple(copied), tuple(skipped))


def maybe_init_student(distiller: nn.Module, init_student: bool, *, resuming: bool,
                       log: Callable[[str], None] | None = None) -> InitReport | None:
    """The worker's one call: :func:`copy_neck_and_head` from ``distiller.teacher`` into
    ``distiller.student`` when ``init_student`` and not ``resuming``; None otherwise."""
    if not init_student or resuming:
        return None
    teacher = getattr(distiller, "teacher", None)
    if teacher is None:
        raise ConfigError("train.init_student needs a teacher; add a kd term or set init_student false")
    report = copy_neck_and_head(distiller.student, teacher)
    if log:
        log(f"init_student: {len(report.copied)} neck/head tensors copied from the teacher")
    return report
