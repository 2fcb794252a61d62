"""Capture a detector's FPN features without editing torchvision, and align teacher to student.

Every torchvision detector runs ``features = model.backbone(images.tensors)`` (an OrderedDict of
FPN levels, each (N, C, H_l, W_l)) before its heads, so a forward hook on ``model.backbone`` sees
exactly the maps the heads use. Keys are renamed to canonical level names (``p3`` ... ``p7``, see
:func:`kdsweep.models.detectors.level_names`) so teacher and student levels match by name.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdsweep.models.detectors import level_names


def _rename(model: nn.Module, feats: Mapping[str, Tensor], levels: Sequence[str] | None) -> dict[str, Tensor]:
    names = level_names(model)
    out = {names[key]: value for key, value in feats.items()}
    return out if levels is None else {name: out[name] for name in levels}


class FeatureTap:
    """Forward hook on ``model.backbone`` recording its FPN output on every forward.

    ``tap.features`` holds the last forward's maps, ``{"p3": (N, C, H/8, W/8), ...}`` (only
    ``levels`` if given), still attached to the autograd graph; :meth:`pop` hands them over and
    drops the reference. The hook returns nothing, so model outputs are unchanged.

    Use as a context manager (hook removed on exit) or keep it and call :meth:`remove`::

        with FeatureTap(student, levels=("p3", "p4")) as tap:
            losses = student(images, targets)
        feats = tap.pop()
    """

    def __init__(self, model: nn.Module, levels: Sequence[str] | None = None) -> None:
        self._model = model
        self._levels = tuple(levels) if levels is not None else None
        missing = set(self._levels or ()) - set(level_names(model).values())
        if missing:
            raise ValueError(f"FeatureTap: levels {sorted(missing)} not in {list(level_names(model).values())}")
        self.features: dict[str, Tensor] = {}
        self._handle = model.backbone.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: Mapping[str, Tensor]) -> None:
        self.features = _rename(self._model, output, self._levels)

    def pop(self) -> dict[str, Tensor]:
        """Return the last recorded features and forget them."""
        feats, self.features = self.features, {}
        return feats

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        self._handle.remove()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def extract_features(
    model: nn.Module, images: list[Tensor], levels: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """FPN features of ``model`` for ``images``: ``model.transform`` + ``model.backbone`` only (no heads).

    Used for the teacher: its transform resizes to *its own* ``min_size``/``max_size`` (ScaleKD's
    high-resolution teacher has them ``teacher_scale`` x the student's), normalises and pads the
    batch to a multiple of 32. Autograd is left to the caller (the Distiller uses ``no_grad``).

    Args:
        images: N images (3, H_i, W_i), values in [0, 1], any sizes.
        levels: canonical names to keep (default: all).
    Returns:
        ``{"p3": (N, C, H/8, W/8), ...}`` with H, W the padded transformed batch size.
    """
    batch, _ = model.transform(images)
    return _rename(model, model.backbone(batch.tensors), levels)


def _crop_or_pad(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop or replicate-pad the bottom/right of (N, C, h, w) to ``size`` (torchvision pads there)."""
    x = x[..., : size[0], : size[1]]
    pad_h, pad_w = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x


def resize_teacher(teacher: Tensor, size: tuple[int, int], teacher_scale: float | None = None) -> Tensor:
    """Bring a teacher map (N, C, h, w) to the student's (H, W) with bilinear interpolation.

    ``teacher_scale`` None: resize the whole map to (H, W). With ``teacher_scale`` r: resize by
    1/r (to round(h/r), round(w/r)), then crop or replicate-pad the bottom/right to (H, W). The
    second keeps image content aligned when the two padded canvases are not proportional: each
    transform pads its batch to a multiple of 32 at its own resolution, so e.g. a 4:3 image at
    min=max=192 is a 144x192 image on a 160x192 canvas for the student but 288x384 on 288x384 for
    the teacher (r=2); a plain resize would shrink the teacher's content by 10%. Both are the
    same whenever the canvases are proportional (e.g. square inputs, sizes multiples of 32).
    Bilinear with ``align_corners=False`` (pixel-area centres, as torchvision's resize) is the
    choice here; for r=2 it averages each 2x2 teacher neighbourhood, i.e. it acts like the
    stride-2 sampling a student at half resolution sees.
    """
    if teacher.shape[-2:] == size:
        return teacher
    if teacher_scale is None:
        return F.interpolate(teacher, size=size, mode="bilinear", align_corners=False)
    target = (max(1, round(teacher.shape[-2] / teacher_scale)), max(1, round(teacher.shape[-1] / teacher_scale)))
    if target != tuple(teacher.shape[-2:]):
        teacher = F.interpolate(teacher, size=target, mode="bilinear", align_corners=False)
    return _crop_or_pad(teacher, size)


def align_to(
    student_feats: Mapping[str, Tensor],
    teacher_feats: Mapping[str, Tensor],
    levels: Sequence[str],
    teacher_scale: float | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Matched per-level lists ``(student, teacher)`` with teacher maps at the student's size.

    Args:
        student_feats / teacher_feats: ``{"p3": (N, C_s|C_t, H_l, W_l), ...}``.
        levels: canonical names to return, in this order.
        teacher_scale: the teacher's input resolution relative to the student's (see
            :func:`resize_teacher`); None resizes each whole teacher map to the student's size.
    Returns:
        Two lists of len(levels): student maps as given; teacher maps (N, C_t, H_l, W_l) cast to
        the student's dtype. Channels are not touched (that is the loss terms' adapters' job).
    """
    students, teachers = [], []
    for name in levels:
        s, t = student_feats[name], teacher_feats[name]
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"align_to: level {name} batch sizes differ ({s.shape[0]} vs {t.shape[0]})")
        students.append(s)
        teachers.append(resize_teacher(t, tuple(s.shape[-2:]), teacher_scale).to(s.dtype))
    return students, teachers


__all__ = ["FeatureTap", "extract_features", "align_to", "resize_teacher"]
