"""What a KD term may look at in one training step, captured without editing torchvision.

Feature terms (l1, l2, ssim) only need matched FPN maps. Methods that distil from proposals,
heads or ground truth (Li 2017's proposal mimic, ScaleKD's SDF and cross-scale assistant) need
more of the step: the student's transformed targets, its RPN proposals, its dense-head outputs
and anchors, the last backbone stage, and how far training has got. Each term declares what it
needs (:class:`~kdsweep.kd.term.Need`); :class:`StepTap` installs exactly the forward hooks on the
student's submodules that record those during its normal loss forward, :func:`teacher_outputs`
does the same on the frozen teacher, and a :class:`KDStep` hands the lot to every term.

Torchvision's detectors all run ``transform -> backbone (body -> fpn) -> heads``; the hooks sit on
``model.transform`` (its output is ``(ImageList, targets)`` in the network's input coordinates),
``model.backbone.body`` (an OrderedDict of backbone stages, the last is ScaleKD's embedding Z),
``model.head`` and ``model.anchor_generator`` (RetinaNet, FCOS) and ``model.rpn`` (Faster R-CNN;
output ``(proposals, losses)``).

Regions a term cuts from both models (Li 2017's two-stage mimic, MimicDet's external teacher)
are mapped into the teacher's input coordinates in one place, :meth:`KDStep.teacher_rois`, and
handed to a model's RoI pooler keyed as it expects by :func:`roi_levels`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdsweep.kd.term import Need
from kdsweep.models.cross_scale import feature_upsample
from kdsweep.models.detectors import level_names
from kdsweep.models.taps import align_to, extract_features

__all__ = ["KDStep", "StepTap", "TeacherOutputs", "body_channels", "roi_levels", "teacher_boxes", "teacher_outputs"]


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
class KDStep:
    """Everything one KD term sees in one training step.

    Attributes:
        student, teacher: the unwrapped student detector (training graph) and the frozen teacher.
        student_feats: canonical level -> (N, C_s, H_l, W_l) student FPN maps (attached to autograd).
        teacher_out: the teacher's maps and sizes (:class:`TeacherOutputs`).
        levels: the levels this term was configured for (student order).
        teacher_scale: teacher input resolution / student input resolution (the maps' ratio is
            this over the student's :func:`~kdsweep.models.cross_scale.feature_upsample`).
        progress: fraction of training done before this step, in [0, 1] (for schedules).
        targets: per image ``boxes`` (n, 4) xyxy and ``labels`` (n,), in the student's input
            coordinates (after its transform's resize), or None (:attr:`Need.TARGETS`).
        image_sizes: per image (H, W) after the student's transform.
        student_body: last backbone stage of the student (N, C_body_s, H/32, W/32) (:attr:`Need.BODY`).
        head_outputs: the student's dense-head outputs (RetinaNet/FCOS), e.g.
            ``{"cls_logits": (N, sum_l H_l W_l A, K), "bbox_regression": (N, ..., 4)}`` (:attr:`Need.HEAD`).
        anchors: per image (sum_l H_l W_l A, 4) anchors of the dense head.
        proposals: per image (P, 4) RPN proposals of a two-stage student (detached by torchvision)
            (:attr:`Need.PROPOSALS`).
        module_outputs: student submodule path -> its outputs in call order (:attr:`Need.MODULE_OUTPUTS`).
    """

    student: nn.Module
    teacher: nn.Module | None
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
    module_outputs: dict[str, list[Tensor]] | None = None

    @property
    def teacher_feats(self) -> dict[str, Tensor]:
        return self.teacher_out.feats

    def aligned(self, levels: Sequence[str] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Matched (student, teacher) map lists for ``levels`` (default: the term's), teacher
        maps resized to the student's (see :func:`kdsweep.models.taps.align_to`)."""
        scale = self.teacher_scale
        if scale is not None:  # a student whose maps a deconvolution upsampled: the maps' own ratio
            scale = scale / feature_upsample(self.student)
        return align_to(self.student_feats, self.teacher_feats, tuple(levels or self.levels), scale)

    def teacher_rois(self, boxes: Sequence[Tensor], student_sizes: Sequence[tuple[int, int]] | None = None,
                     ) -> tuple[list[Tensor], list[tuple[int, int]]]:
        """Per-image boxes in the student's input coordinates mapped into the teacher's, and the
        teacher's image sizes (:func:`teacher_boxes` with this step's sizes and scale;
        ``student_sizes`` defaults to :attr:`image_sizes`)."""
        sizes = list(self.image_sizes or []) if student_sizes is None else list(student_sizes)
        return teacher_boxes(boxes, sizes, list(self.teacher_out.image_sizes or []), self.teacher_scale)


def teacher_boxes(
    boxes: Sequence[Tensor], student_sizes: Sequence[tuple[int, int]], teacher_sizes: Sequence[tuple[int, int]],
    teacher_scale: float | None = None,
) -> tuple[list[Tensor], list[tuple[int, int]]]:
    """Per-image boxes in the student's input coordinates -> the teacher's, and the teacher's
    image sizes: x by ``tw / sw``, y by ``th / sh`` per image (``teacher_scale`` up to the two
    transforms' rounding); when the teacher's sizes are not known (or do not match the batch),
    everything by ``teacher_scale`` (1 when None).

    Shape:
        - boxes: per image ``(R_i, 4)`` xyxy; output: the same shapes.
    """
    if len(teacher_sizes) == len(boxes) and len(student_sizes) == len(boxes):
        out = []
        for b, (sh, sw), (th, tw) in zip(boxes, student_sizes, teacher_sizes):
            out.append(b * b.new_tensor([tw / sw, th / sh, tw / sw, th / sh]))
        return out, [(int(h), int(w)) for h, w in teacher_sizes]
    scale = 1.0 if teacher_scale is None else float(teacher_scale)
    return [b * scale for b in boxes], [(round(h * scale), round(w * scale)) for h, w in student_sizes]


def roi_levels(model: nn.Module, feats: Mapping[str, Tensor], who: str, term: str) -> OrderedDict[str, Tensor]:
    """Canonical ``p<k>`` maps -> the torchvision keys ``model``'s RoI pooler
    (``roi_heads.box_roi_pool``) reads, in its order.

    Raises:
        RuntimeError: a level the pooler reads was not captured (names ``who`` and ``term``).
    """
    names = level_names(model)
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key in model.roi_heads.box_roi_pool.featmap_names:
        level = names.get(key)
        if level not in feats:
            raise RuntimeError(f"kd.{term}: the {who}'s level {level} (its RoI pooler's '{key}') was not captured; "
                               f"kd.{term} uses every level (drop kd.{term}.levels)")
        out[key] = feats[level]
    return out


class StepTap:
    """Forward hooks recording what the terms need of a student step (see the module docstring).

    Use as a context manager around the student's loss forward; then :meth:`fill` copies what
    was seen into a :class:`KDStep`. Only the hooks of ``needs`` are installed; they return
    nothing (outputs are unchanged).
    """

    def __init__(self, model: nn.Module, needs: Collection[Need], taps: Collection[str] = ()) -> None:
        self.seen: dict[str, Any] = {}
        self._handles = []
        hooks: dict[str, Any] = {}
        if Need.TARGETS in needs or Need.PROPOSALS in needs:
            hooks["transform"] = self._on_transform
        if Need.BODY in needs:
            hooks["backbone.body"] = self._on_body
        if Need.HEAD in needs:
            hooks["head"] = self._on_head
            hooks["anchor_generator"] = self._on_anchors
        if Need.PROPOSALS in needs:
            hooks["rpn"] = self._on_rpn
        for path, hook in hooks.items():
            module = _get(model, path)
            if module is not None:
                self._handles.append(module.register_forward_hook(hook))
        if Need.MODULE_OUTPUTS in needs and taps:
            outputs: dict[str, list[Tensor]] = {path: [] for path in taps}
            self.seen["module_outputs"] = outputs
            for path in taps:
                module = _get(model, path)
                if module is None:
                    raise ValueError(f"{type(model).__name__} has no submodule '{path}' to tap")
                if not isinstance(module, _TENSOR_LAYERS):
                    raise ValueError(f"'{path}' is a {type(module).__name__}; taps read layers that return one "
                                     "tensor (convolutions, normalisations, activations)")
                self._handles.append(module.register_forward_hook(
                    lambda m, i, out, store=outputs[path]: store.append(out.clone())))

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

    def fill(self, step: KDStep) -> KDStep:
        """Copy the recorded internals into ``step`` (fields left None when not seen)."""
        for key, value in self.seen.items():
            setattr(step, key, value)
        return step


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, images: list[Tensor], levels: Sequence[str] | None,
                    needs: Collection[Need]) -> TeacherOutputs:
    """The frozen teacher's FPN maps of ``levels`` (every level with :attr:`Need.TEACHER_LEVELS`
    or ``levels=None``), its last backbone stage (:attr:`Need.BODY`) and its image sizes, from
    one eval-mode forward of ``images`` (its transform resizes them to its own resolution)."""
    seen: dict[str, Any] = {}
    handles = []
    if Need.BODY in needs:
        handles.append(teacher.backbone.body.register_forward_hook(
            lambda m, i, out: seen.__setitem__("body", list(out.values())[-1])))
    handles.append(teacher.transform.register_forward_hook(
        lambda m, i, out: seen.__setitem__("sizes", [tuple(s) for s in out[0].image_sizes])))
    try:
        feats = extract_features(teacher, images, levels=None if Need.TEACHER_LEVELS in needs else levels)
    finally:
        for handle in handles:
            handle.remove()
    return TeacherOutputs(feats=feats, body=seen.get("body"), image_sizes=seen.get("sizes", []))


_TENSOR_LAYERS = (nn.Conv2d, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.ReLU, nn.Identity, nn.Linear)
"""Layers whose output is one tensor: what :attr:`Need.MODULE_OUTPUTS` may tap (``_BatchNorm``
covers BatchNorm2d and its synchronised forms, ``nn.SyncBatchNorm`` and
:class:`~kdsweep.train.distiller.HostSyncBatchNorm`, which a multi-worker run converts it to)."""


def _get(model: nn.Module, path: str) -> nn.Module | None:
    module: Any = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def body_channels(model: nn.Module) -> int:
    """Channels of the last backbone stage of a torchvision detector (a dry run on 64x64)."""
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
