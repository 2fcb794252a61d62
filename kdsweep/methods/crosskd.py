"""CrossKD: cross-head knowledge distillation for dense detectors (registry key ``crosskd``).

Reference:
    Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection", CVPR 2024.
    Instead of pulling the student's predictions towards the teacher's (whose targets conflict
    with the ground truth the student's own head is also trained on), CrossKD feeds the student's
    *intermediate head features* into the rest of the frozen *teacher's* head and distils those
    cross-head predictions to the teacher's own (the paper's Eq. 3-5). Only the part of the
    student before the cut gets the KD gradient; the student's own last layers learn from the
    ground truth alone. COCO, RetinaNet R101 -> R50 (2x): 37.4 -> 39.7 AP; FCOS R101 -> R50
    (2x, multi-scale): 38.5 -> 41.1 (the authors' README).

**Which torchvision layers are "intermediate".** Both towers of a torchvision RetinaNet or FCOS
head (``head.classification_head.conv`` and ``head.regression_head.conv``) are ``num_convs``
blocks of ``Conv2d [-> GroupNorm] -> ReLU``. With ``index = i`` the student's tower runs its first
``i`` blocks up to, not including, the i-th ReLU (the conv's, or its GroupNorm's, output: the
authors' ``activate=False`` feature); the teacher's tower continues from that ReLU (its blocks
``i+1..num_convs``), then its predictor (``cls_logits``; ``bbox_reg``, with FCOS's ReLU on it;
FCOS's centerness is not distilled, as the authors'). The authors' settings, the defaults here:
RetinaNet ``index = 3`` (of 4), FCOS ``index = 2``.

Before the teacher's layers, the student's feature is re-standardised to the teacher's
per-channel statistics at the same cut (the authors' ``align_scale``: zero mean and unit variance
per channel over ``(N, H, W)``, then times the teacher's std plus its mean; population statistics
with ``eps^2`` in the variance, where the authors' Bessel-corrected std is NaN on a 1x1 map of a
one-image batch). When the towers'
widths differ (the CPU presets' FPNs), ``adapter: true`` puts a learned 1x1 conv first (the paper's
heads are both 256 wide and have none).

Losses, per image and anchor ``a`` of every level, with the student's own anchor matching for the
normaliser ``n_pos`` (the number of foreground anchors, at least 1):

* ``cls`` (Eq. 4, the authors' ``KDQualityFocalLoss``, ``beta = 1``):
  ``sum_{a valid, k} BCE(z_ak, sigmoid(t_ak)) |sigmoid(z_ak) - sigmoid(t_ak)|^beta / n_pos``,
  ``z`` the cross-head logits, ``t`` the teacher's; "valid" leaves out RetinaNet's ignored anchors
  (IoU between its two thresholds);
* ``reg`` (Eq. 5): ``sum_{a valid} w_a GIoU-loss(decode(d_a), decode(d^T_a)) / n_pos`` with
  ``w_a = sigmoid(max_k t_ak)``: every valid anchor, weighted by the teacher's confidence (0 where
  the teacher's box has no area, e.g. FCOS distances that its ReLU set to 0: GIoU is undefined there).

Weights: RetinaNet ``cls_weight = 1``, ``reg_weight = 1``; FCOS 0.4 and 0.75 (the authors'
configs). A batch without any box has ``n_pos = 1`` over every anchor: a larger KD loss for that
step, as in the authors' code. The teacher must see the student's input size and anchors (checked
when the term is built). Deviations: FCOS's normaliser is ``n_pos`` (the authors' is the sum of the positives'
centerness targets) and its box loss is GIoU (theirs is IoU), the one torchvision's FCOS trains
with. The teacher's parameters are frozen: gradients pass *through* its layers to the student's
feature, never into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.ops import generalized_box_iou_loss

from kdsweep.config import ConfigError
from kdsweep.kd.adapters import check_widths, resolve_adapter
from kdsweep.kd.step import KDStep
from kdsweep.kd.term import KDTerm, Need, TermSpec, reject_unknown
from kdsweep.methods.pkd import channel_std, channel_standardize  # the same per-channel statistics
from kdsweep.models.detectors import level_names

__all__ = ["CROSSKD_DEFAULTS", "CrossKDTerm", "build_crosskd", "kd_quality_focal_loss", "tower_cut"]

CROSSKD_DEFAULTS: dict[str, dict[str, float]] = {
    "retinanet": {"index": 3, "cls_weight": 1.0, "reg_weight": 1.0, "beta": 1.0},
    "fcos": {"index": 2, "cls_weight": 0.4, "reg_weight": 0.75, "beta": 1.0},
}
"""The authors' settings (``crosskd_r50_retinanet_r101_fpn_2x_coco``, ``crosskd_r50_fcos_r101...``)."""

TOWERS = ("classification_head", "regression_head")
PREDICTORS = {"classification_head": ("cls_logits",), "regression_head": ("bbox_reg",)}


def _arch(model: nn.Module | None) -> str | None:
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    return None


def tower_cut(tower: nn.Module, index: int) -> tuple[str, list[nn.Module]]:
    """Where a head tower is cut: the path (in ``tower``) of the layer whose output is the
    intermediate feature, and the layers after it (from the ``index``-th ReLU on), in order.

    Raises:
        ValueError: ``index`` outside ``1..number of ReLUs``.
    """
    leaves = [(name, m) for name, m in tower.named_modules() if not list(m.children())]
    relus = [i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.ReLU)]
    if not 1 <= index <= len(relus):
        raise ValueError(f"index {index} is outside 1..{len(relus)} (the tower's conv blocks)")
    cut = relus[index - 1]
    return leaves[cut - 1][0], [m for _, m in leaves[cut:]]


def _run(layers: Sequence[nn.Module], x: Tensor) -> Tensor:
    for layer in layers:  # ReLU out of place: the input may be needed by autograd
        x = F.relu(x) if isinstance(layer, nn.ReLU) else layer(x)
    return x


def _flatten(x: Tensor, per_anchor: int) -> Tensor:
    """``(N, A*K, H, W) -> (N, H*W*A, K)``, torchvision's dense-head layout."""
    n, _, h, w = x.shape
    return x.view(n, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, per_anchor)


def kd_quality_focal_loss(logits: Tensor, teacher_logits: Tensor, beta: float = 1.0) -> Tensor:
    """Elementwise ``BCE(z, sigmoid(t)) * |sigmoid(z) - sigmoid(t)|^beta`` (the authors' KD QFL).

    Shape: any, both the same; output the same shape (0 where ``z = t``).
    """
    target = teacher_logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce * (logits.sigmoid() - target).abs().pow(beta)


class _Matched:
    """Stands in for a head in torchvision's ``compute_loss`` and returns its anchor matching."""

    def compute_loss(self, targets: Any, head_outputs: Any, anchors: Any, matched_idxs: list[Tensor]) -> list[Tensor]:
        return matched_idxs


def matched_anchors(student: nn.Module, targets: list[dict[str, Tensor]], anchors: list[Tensor],
                    per_level: list[int]) -> list[Tensor]:
    """Per image ``(sum_l H_l W_l A,)`` matched GT index (-1 background, -2 ignored), by the
    student's own matching (torchvision's ``RetinaNet.compute_loss`` / ``FCOS.compute_loss`` with
    the head's loss replaced by returning the matching)."""
    if isinstance(student, RetinaNet):
        proxy = SimpleNamespace(proposal_matcher=student.proposal_matcher, head=_Matched())
        return RetinaNet.compute_loss(proxy, targets, {}, anchors)  # type: ignore[arg-type]
    proxy = SimpleNamespace(center_sampling_radius=student.center_sampling_radius, head=_Matched())
    return FCOS.compute_loss(proxy, targets, {}, anchors, per_level)  # type: ignore[arg-type]


class CrossKDTerm(KDTerm):
    """``crosskd`` (see the module docstring). Built by :func:`build_crosskd`.

    Shape:
        - forward: the student's tapped intermediate features (per tower, per level
          ``(N, C_s, H_l, W_l)``), the teacher's FPN maps at the same sizes, the student's anchors
          and targets; output ``{"cls": (), "reg": ()}``, already times ``cls_weight``/``reg_weight``.
    """

    needs = frozenset({Need.MODULE_OUTPUTS, Need.HEAD, Need.TARGETS, Need.TEACHER_LEVELS})

    def __init__(self, *, arch: str, cut: str, taps: tuple[str, str], student_channels: int, teacher_channels: int,
                 num_levels: int, adapter: bool | str, index: int, cls_weight: float, reg_weight: float, beta: float,
                 name: str = "crosskd") -> None:
        super().__init__()
        self.name, self.arch, self.cut, self.taps = name, arch, cut, taps
        self.index, self.cls_weight, self.reg_weight, self.beta = int(index), cls_weight, reg_weight, beta
        self.num_levels = num_levels
        check_widths(name, student_channels, teacher_channels, num_levels, adapter)
        self.adapters = (nn.ModuleDict({t: nn.Conv2d(student_channels, teacher_channels, 1) for t in TOWERS})
                         if resolve_adapter(adapter, student_channels, teacher_channels) else None)

    def teacher_paths(self, teacher: nn.Module) -> dict[str, tuple[list[nn.Module], list[nn.Module], tuple[nn.Module, ...]]]:
        """Per tower: the teacher's layers before the cut, after it, and its predictors."""
        out = {}
        for tower in TOWERS:
            head = getattr(teacher.head, tower)
            leaves = [m for _, m in head.conv.named_modules() if not list(m.children())]
            _, after = tower_cut(head.conv, self.index)
            before = leaves[: len(leaves) - len(after)]
            out[tower] = (before, after, tuple(getattr(head, p) for p in PREDICTORS[tower]))
        return out

    def _predict(self, tower: str, predictors: tuple[nn.Module, ...], x: Tensor, classes: int) -> Tensor:
        if tower == "classification_head":
            return _flatten(predictors[0](x), classes)
        deltas = predictors[0](x)
        return _flatten(F.relu(deltas) if self.arch == "fcos" else deltas, 4)

    def _decode(self, student: nn.Module, deltas: Tensor, anchors: Tensor) -> Tensor:
        """``(N, R, 4)`` deltas on ``(N, R, 4)`` anchors -> boxes, by the student's coder."""
        if self.arch == "fcos":
            return student.head.box_coder.decode(deltas, anchors)
        n = deltas.shape[0]
        return student.box_coder.decode_single(deltas.reshape(-1, 4), anchors.reshape(-1, 4)).view(n, -1, 4)

    def forward(self, step: KDStep) -> dict[str, Tensor]:
        teacher = step.teacher
        if teacher is None or step.module_outputs is None or step.targets is None or step.anchors is None:
            raise RuntimeError(f"kd.{self.name}: the teacher, the head features, targets or anchors were not captured")
        if any(p.requires_grad for p in teacher.head.parameters()):
            raise RuntimeError(f"kd.{self.name}: the teacher's head is not frozen; the KD gradient would reach it "
                               "(kdsweep.train.distiller.freeze(teacher) first)")
        student_levels = list(level_names(step.student).values())
        t_feats = [step.teacher_feats[lv] for lv in student_levels]
        classes = step.student.head.classification_head.num_classes
        outputs: dict[str, tuple[Tensor, Tensor]] = {}
        for tower, (before, after, predictors) in self.teacher_paths(teacher).items():
            held = step.module_outputs[self.taps[TOWERS.index(tower)]][-self.num_levels:]
            crossed, target = [], []
            for level, (s, t) in enumerate(zip(held, t_feats)):
                with torch.no_grad():
                    t_held = _run(before, t.to(s.dtype))
                    target.append(self._predict(tower, predictors, _run(after, t_held), classes))
                if s.shape[-2:] != t_held.shape[-2:]:
                    raise RuntimeError(
                        f"kd.{self.name}: level {student_levels[level]}: student map {tuple(s.shape[-2:])} vs teacher "
                        f"{tuple(t_held.shape[-2:])}; CrossKD runs the teacher's head on the student's anchors, so "
                        "the teacher must see the student's resolution (teacher_scale 1)")
                if self.adapters is not None:
                    s = self.adapters[tower](s)
                s = channel_standardize(s) * channel_std(t_held) + t_held.mean((0, 2, 3), keepdim=True)
                crossed.append(self._predict(tower, predictors, _run(after, s), classes))
            outputs[tower] = (torch.cat(crossed, dim=1), torch.cat(target, dim=1))
        logits, t_logits = outputs["classification_head"]
        deltas, t_deltas = outputs["regression_head"]
        per_location = getattr(step.student.head.classification_head, "num_anchors", 1)
        per_level = [int(t.shape[-2] * t.shape[-1]) * per_location for t in t_feats]
        anchors = torch.stack(list(step.anchors))
        matched = torch.stack(matched_anchors(step.student, step.targets, list(step.anchors), per_level))
        valid = (matched != -2).to(logits.dtype)  # RetinaNet's ignored anchors (between the thresholds)
        n_pos = (matched >= 0).sum().clamp_min(1).to(logits.dtype)
        cls = (kd_quality_focal_loss(logits, t_logits, self.beta).sum(-1) * valid).sum() / n_pos
        weight = t_logits.max(dim=-1).values.sigmoid() * valid
        boxes = self._decode(step.student, deltas, anchors)
        with torch.no_grad():
            t_boxes = self._decode(step.student, t_deltas, anchors)
            # a box of zero area (FCOS's ReLU'd distances at 0) has no GIoU: not a target
            weight = weight * ((t_boxes[..., 2] > t_boxes[..., 0]) & (t_boxes[..., 3] > t_boxes[..., 1])).to(weight.dtype)
        giou = generalized_box_iou_loss(boxes.reshape(-1, 4), t_boxes.reshape(-1, 4), reduction="none")
        reg = (giou.view_as(weight) * weight).sum() / n_pos
        return {"cls": self.cls_weight * cls, "reg": self.reg_weight * reg}

    def extra_repr(self) -> str:
        return (f"{self.arch}, cut after block {self.index} ('{self.cut}'), cls_weight={self.cls_weight}, "
                f"reg_weight={self.reg_weight}, beta={self.beta}")


def build_crosskd(spec: TermSpec) -> CrossKDTerm:
    """Registry builder: ``params: {index, cls_weight, reg_weight, beta}`` (defaults per detector,
    :data:`CROSSKD_DEFAULTS`).

    Raises:
        ConfigError: a student or teacher that is not RetinaNet/FCOS, different detectors or class
            counts or anchors per location, a level subset, different widths without ``adapter``.
    """
    arch, teacher_arch = _arch(spec.student), _arch(spec.teacher)
    if arch is None:
        raise ConfigError(f"kd.{spec.name}: CrossKD needs a dense-head student (RetinaNet or FCOS), got "
                          f"{type(spec.student).__name__}; set student.arch to retinanet or fcos")
    if teacher_arch != arch:
        raise ConfigError(f"kd.{spec.name}: CrossKD runs the student's features through the teacher's head, so both "
                          f"must be {arch}; the teacher is {type(spec.teacher).__name__} (set teacher.arch: {arch})")
    s_head, t_head = spec.student.head, spec.teacher.head
    ks, kt = s_head.classification_head.num_classes, t_head.classification_head.num_classes
    if ks != kt:
        raise ConfigError(f"kd.{spec.name}: the student predicts {ks} classes, the teacher {kt}; CrossKD compares "
                          "their logits class by class, so train the teacher on the student's dataset")
    s_anchors, t_anchors = spec.student.anchor_generator, spec.teacher.anchor_generator
    if (s_anchors.sizes, s_anchors.aspect_ratios) != (t_anchors.sizes, t_anchors.aspect_ratios):
        raise ConfigError(f"kd.{spec.name}: the teacher's anchors (sizes {t_anchors.sizes}) differ from the student's "
                          f"({s_anchors.sizes}); CrossKD decodes both heads on the student's anchors, so set "
                          "teacher.anchor_scale equal to student.anchor_scale (and no student.upsample)")
    s_size = (tuple(spec.student.transform.min_size), spec.student.transform.max_size)
    t_size = (tuple(spec.teacher.transform.min_size), spec.teacher.transform.max_size)
    if s_size != t_size:
        raise ConfigError(f"kd.{spec.name}: the teacher runs at min/max size {t_size}, the student at {s_size}; CrossKD "
                          "runs the teacher's head on the student's anchors, so set teacher_scale and student_scale to 1")
    all_levels = tuple(level_names(spec.student).values())
    if tuple(spec.levels) != all_levels:
        raise ConfigError(f"kd.{spec.name}: CrossKD distils the whole head output, so it uses every level "
                          f"({', '.join(all_levels)}); drop kd.{spec.name}.levels")
    params: dict[str, Any] = dict(CROSSKD_DEFAULTS[arch], **spec.params)
    reject_unknown(spec.name, spec.params, list(CROSSKD_DEFAULTS[arch]))
    index = params["index"]
    if isinstance(index, bool) or not isinstance(index, (int, float)) or int(index) != index:
        raise ConfigError(f"kd.{spec.name}.params.index must be an integer (the head conv to cut after), got {index!r}")
    for key in ("cls_weight", "reg_weight", "beta"):
        if isinstance(params[key], bool) or not isinstance(params[key], (int, float)):
            raise ConfigError(f"kd.{spec.name}.params.{key} must be a number, got {params[key]!r}")
    try:
        cut, _ = tower_cut(s_head.classification_head.conv, int(index))
        tower_cut(t_head.classification_head.conv, int(index))
    except ValueError as exc:
        raise ConfigError(f"kd.{spec.name}.params.index: {exc}") from None
    for key in ("cls_weight", "reg_weight", "beta"):
        if params[key] < 0:
            raise ConfigError(f"kd.{spec.name}.params.{key} must be >= 0, got {params[key]!r}")
    taps = tuple(f"head.{tower}.conv.{cut}" for tower in TOWERS)
    return CrossKDTerm(arch=arch, cut=cut, taps=taps, student_channels=spec.student_channels,  # type: ignore[arg-type]
                       teacher_channels=spec.teacher_channels, num_levels=len(all_levels), adapter=spec.adapter,
                       index=int(index), cls_weight=float(params["cls_weight"]), reg_weight=float(params["reg_weight"]),
                       beta=float(params["beta"]), name=spec.name)
