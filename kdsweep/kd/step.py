"""What a KD term may look at in one training step, captured without editing torchvision.

Feature terms (l1, l2, ssim) only need matched FPN maps. Methods that distil from proposals,
heads or ground truth (Li 2017's proposal mimic, ScaleKD's SDF and cross-scale assistant) need
more of the step: the student's transformed targets, its RPN proposals, its dense-head outputs
and anchors, the last backbone stage, and how far training has got. :class:`StepTap` records all
of that from forward hooks on the student's submodules during its normal loss forward, and the
:class:`KDContext` hands it to every term whose module sets ``uses_context = True``.

Torchvision's detectors all run ``transform -> backbone (body -> fpn) -> heads``; the hooks sit on
``model.transform`` (its output is ``(ImageList, targets)`` in the network's input coordinates),
``model.backbone.body`` (an OrderedDict of backbone stages, the last is ScaleKD's embedding Z),
``model.head`` and ``model.anchor_generator`` (RetinaNet, FCOS) and ``model.rpn`` (Faster R-CNN;
output ``(proposals, losses)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, TypeVar

import torch
from torch import Tensor, nn

from kdsweep.models.taps import align_to


T = TypeVar("T")


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)``, or a no-op for device types without
    autocast (``meta``: the preflight builds and probes models there)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def to_float32(obj: T) -> T:
    """``obj`` with every half-precision (float16/bfloat16) tensor in it cast to float32.

    Walks dicts, lists, tuples and dataclass instances (:class:`TeacherOutputs`,
    :class:`KDContext`, a MimicDet's recorded mimic inputs); modules, other tensors and other values
    are returned as they are (the same objects). A term's input under autocast comes out as it would in a float32 step, up to
    the rounding the half-precision forward already did; autograd flows through the cast.
    """
    if isinstance(obj, Tensor):
        return obj.float() if obj.dtype in (torch.float16, torch.bfloat16) else obj  # type: ignore[return-value]
    if isinstance(obj, dict):  # dict, OrderedDict
        return type(obj)((k, to_float32(v)) for k, v in obj.items())  # type: ignore[return-value]
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_float32(v) for v in obj)  # type: ignore[return-value]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_float32(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                   if f.init and not isinstance(getattr(obj, f.name), nn.Module)}
        return dataclasses.replace(obj, **changes)  # type: ignore[return-value]
    return obj


@dataclass
class TeacherOutputs:
    """The frozen teacher's view of a batch (no autograd).

    Attributes:
        feats: canonical level -> (N, C_t, h_l, w_l) FPN maps at the teacher's own resolution.
        body: last backbone stage (N, C_body_t, h/32, w/32), or None.
        image_sizes: per image (h, w) after the teacher's transform (before batch padding).
    """

    feats: dict[str, Tensor]
    body: Tensor | None = None
    image_sizes: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class KDContext:
    """Everything one KD term sees in one training step.

    Attributes:
        student, teacher: the unwrapped student detector (training graph) and the frozen teacher.
        student_feats: canonical level -> (N, C_s, H_l, W_l) student FPN maps (attached to autograd).
        teacher: see above; ``teacher_out`` holds its maps (:class:`TeacherOutputs`).
        levels: the levels this term was configured for (student order).
        teacher_scale: teacher resolution / student resolution.
        progress: fraction of training done before this step, in [0, 1] (for schedules).
        targets: per image ``boxes`` (n, 4) xyxy and ``labels`` (n,), in the student's input
            coordinates (after its transform's resize), or None.
        image_sizes: per image (H, W) after the student's transform.
        student_body: last backbone stage of the student (N, C_body_s, H/32, W/32).
        head_outputs: the student's dense-head outputs (RetinaNet/FCOS), e.g.
            ``{"cls_logits": (N, sum_l H_l W_l A, K), "bbox_regression": (N, ..., 4)}``.
        anchors: per image (sum_l H_l W_l A, 4) anchors of the dense head.
        proposals: per image (P, 4) RPN proposals of a two-stage student (detached by torchvision).
    """

    student: nn.Module
    teacher: nn.Module
    student_feats: dict[str, Tensor]
    teacher_out: TeacherOutputs
    levels: tuple[str, ...]
    teacher_scale: float | None = None
    progress: float = 0.0
    targets: list[dict[str, Tensor]] | None = None
    image_sizes: list[tuple[int, int]] | None = None
    student_body: Tensor | None = None
    head_outputs: dict[str, Tensor] | None = None
    anchors: list[Tensor] | None = None
    proposals: list[Tensor] | None = None

    @property
    def teacher_feats(self) -> dict[str, Tensor]:
        return self.teacher_out.feats

    def aligned(self, levels: Sequence[str] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Matched (student, teacher) map lists for ``levels`` (default: the term's), teacher
        maps resized to the student's (see :func:`kdsweep.models.taps.align_to`)."""
        return align_to(self.student_feats, self.teacher_feats, tuple(levels or self.levels), self.teacher_scale)


class StepTap:
    """Forward hooks recording a student step's internals (see the module docstring).

    Use as a context manager around the student's loss forward; then :meth:`fill` copies what
    was seen into a :class:`KDContext`. The hooks return nothing (outputs are unchanged).
    """

    def __init__(self, model: nn.Module) -> None:
        self.seen: dict[str, Any] = {}
        self._handles = []
        hooks = {
            "transform": self._on_transform,
            "backbone.body": self._on_body,
            "head": self._on_head,
            "anchor_generator": self._on_anchors,
            "rpn": self._on_rpn,
        }
        for path, hook in hooks.items():
            module = _get(model, path)
            if module is not None:
                self._handles.append(module.register_forward_hook(hook))

    def _on_transform(self, module: nn.Module, inputs: Any, output: Any) -> None:
        image_list, targets = output
        self.seen["image_sizes"] = [tuple(s) for s in image_list.image_sizes]
        self.seen["targets"] = targets

    def _on_body(self, module: nn.Module, inputs: Any, output: Mapping[str, Tensor]) -> None:
        self.seen["student_body"] = list(output.values())[-1]

    def _on_head(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, dict):
            self.seen["head_outputs"] = output

    def _on_anchors(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.seen["anchors"] = output

    def _on_rpn(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.seen["proposals"] = output[0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "StepTap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def fill(self, ctx: KDContext) -> KDContext:
        """Copy the recorded internals into ``ctx`` (fields left None when not seen)."""
        for key, value in self.seen.items():
            setattr(ctx, key, value)
        return ctx


def _get(model: nn.Module, path: str) -> nn.Module | None:
    module: Any = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def body_channels(model: nn.Module) -> int:
    """Channels of the last backbone stage of a torchvision detector (a dry run on 64x64)."""
    import torch

    body = _get(model, "backbone.body")
    if body is None:
        raise ValueError(f"{type(model).__name__} has no backbone.body")
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            param = next(body.parameters())
            out = body(torch.zeros(1, 3, 64, 64, device=param.device, dtype=param.dtype))
    finally:
        body.train(was_training)
    return int(list(out.values())[-1].shape[1])


__all__ = ["KDContext", "StepTap", "TeacherOutputs", "autocast_off", "body_channels", "to_float32"]
