"""MimicDet's dual-path mimic with a separately trained teacher: ``mimicdet_teacher`` (registry key).

The ablation row "mimic, separate teacher of the same depth" of MimicDet (Lu et al., ECCV 2020; see
``/work/shared/METHODS.md`` section 2 and :mod:`kdsweep.methods.mimicdet.model`): instead of the T-head
that shares the student's backbone, a separately trained, frozen two-stage detector (a torchvision
Faster R-CNN, the Distiller's teacher) provides the T-side targets of the dual-path mimic.

The student is a MimicDet built with ``options.t_head: external``: it builds no T-head and no P2,
but each training forward samples the T-samples from its refinement output exactly as for its own
T-head, draws the random mimic subset B_m, and stores the student side in
``student.last_mimic_inputs`` (:class:`~kdsweep.methods.mimicdet.model.MimicInputs`).

:class:`ExternalTeacherMimic` (a context term) then, under ``no_grad``:

* maps B_m's RoIs (student input coordinates) into the teacher's input coordinates, per image by
  teacher width / student width in x and height ratio in y, from the two transforms' image sizes
  (``step.teacher_out.image_sizes`` vs the student's; ``teacher_scale`` when the teacher's sizes
  are unknown), as ``mimic_head`` (:class:`kdsweep.methods.mimic.HeadMimicTerm`) does;
* runs the teacher's ``roi_heads.box_roi_pool`` (on its own FPN maps ``step.teacher_out.feats``,
  canonical ``p2``..``p6`` mapped back to the torchvision keys ``'0'``..``'3'`` its
  ``MultiScaleRoIAlign`` reads) -> ``box_head`` -> ``box_predictor``;
* regression-path target: the ``box_head`` output (``TwoMLPHead``, 1024-d by default; *choice*:
  torchvision's Faster R-CNN head has one shared fc feature feeding both predictors, so that
  feature stands in for the paper's T-head regression-branch fc); classification-path target: the
  ``box_predictor`` class logits (K + 1, background at 0, the same convention as MimicDet's softmax
  S-head and its own T-head);

and returns :meth:`MimicDet.mimic_from <kdsweep.methods.mimicdet.model.MimicDet.mimic_from>` of the
student side against those targets: the same per-path similarity (default the student's
``similarity``), the same sigmoid-S-head handling and the same paths (default the student's
``mimic_paths``) as the own T-head's mimic. The loss is unweighted: the ``kd`` entry's ``weight``
is lambda (the student's ``mimic_weight`` is not used in this mode). Gradients reach the S-head
(its own regression feature among them) and the shared backbone; never the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN

from kdsweep.config import ConfigError
from kdsweep.kd.precision import to_float32
from kdsweep.kd.step import KDStep, roi_levels
from kdsweep.kd.term import KDTerm, Need, TermSpec, reject_unknown
from kdsweep.methods.mimicdet.model import MIMIC_PATHS, SIMILARITIES, MimicDet, MimicInputs

__all__ = ["ExternalTeacherMimic", "build_mimicdet_teacher"]

NAME = "mimicdet_teacher"


class ExternalTeacherMimic(KDTerm):
    """``mimicdet_teacher``: dual-path mimic of a MimicDet's S-head against a frozen Faster R-CNN's
    RoI head on the MimicDet's own mimic samples (see the module docstring).

    ``forward(step)`` -> scalar (unweighted). Args: ``similarity`` (``cosine``/``l2``) and ``paths``
    (subset of the student's ``mimic_paths``), both resolved by :func:`build_mimicdet_teacher`.
    """

    name = NAME
    needs = frozenset({Need.TARGETS, Need.TEACHER_LEVELS})

    def __init__(self, *, similarity: str, paths: Sequence[str]) -> None:
        super().__init__()
        self.similarity = similarity
        self.paths = tuple(paths)

    @torch.no_grad()
    def targets(self, teacher: nn.Module, step: KDStep, inputs: MimicInputs) -> tuple[Tensor, Tensor]:
        """The teacher's (class logits (B, K + 1), box-head feature (B, D)) on the mimic RoIs."""
        boxes, sizes = step.teacher_rois(inputs.mimic_rois, inputs.image_sizes or None)
        heads = teacher.roi_heads
        feats = {k: v.detach() for k, v in step.teacher_feats.items()}
        pooled = heads.box_roi_pool(roi_levels(teacher, feats, "teacher", NAME), boxes, sizes)
        feature = heads.box_head(pooled)
        logits, _ = heads.box_predictor(feature)
        return logits, feature

    def forward(self, step: KDStep) -> Tensor:
        student, teacher = step.student, step.teacher
        if teacher is None:
            raise RuntimeError(f"kd.{NAME}: the context carries no teacher model")
        inputs = getattr(student, "last_mimic_inputs", None)
        if inputs is None:
            raise RuntimeError(f"kd.{NAME}: the student recorded no mimic inputs this step "
                               "(a MimicDet with options.t_head: external, in training mode, is needed)")
        if inputs.num_mimic == 0:
            return inputs.zero
        inputs = to_float32(inputs)  # recorded by the student's forward, possibly under autocast
        t_logits, t_feature = self.targets(teacher, step, inputs)
        return student.mimic_from(inputs, t_logits, t_feature, similarity=self.similarity, paths=self.paths)

    def extra_repr(self) -> str:
        return f"similarity={self.similarity!r}, paths={self.paths}"


def build_mimicdet_teacher(spec: TermSpec) -> ExternalTeacherMimic:
    """Registry builder of ``mimicdet_teacher`` (params: ``similarity``, default the student's;
    ``paths``, default the student's ``mimic_paths``). Channels, levels and ``adapter`` are not
    used: the mimic compares head outputs, and the teacher's RoI pooler reads its own levels.

    Raises:
        ConfigError: unknown params; the student is not a MimicDet with ``options.t_head:
            external``; the teacher is not a Faster R-CNN; different class counts; the student's
            ``t_hidden`` is not the teacher's box-head width (reg path); bad similarity or paths.
    """
    params = dict(spec.params)
    student, teacher = spec.student, spec.teacher
    similarity, paths = params.pop("similarity", None), params.pop("paths", None)
    reject_unknown(NAME, params, ("paths", "similarity"))
    if not isinstance(student, MimicDet) or not student.external_teacher:
        got = type(student).__name__ if student is not None else "none"
        if isinstance(student, MimicDet):
            got = "a MimicDet with its own T-head" if student.t_head is not None else "a MimicDet without T-head"
        raise ConfigError(f"kd.{NAME} needs a mimicdet student with options.t_head: external, got {got}")
    if not isinstance(teacher, FasterRCNN):
        got = type(teacher).__name__ if teacher is not None else "none"
        raise ConfigError(f"kd.{NAME} needs a Faster R-CNN teacher (its RoI head gives the mimic targets), "
                          f"got {got}; use teacher.arch: fasterrcnn")
    predictor = teacher.roi_heads.box_predictor
    teacher_classes = int(predictor.cls_score.out_features) - 1
    if teacher_classes != student.num_classes:
        raise ConfigError(f"kd.{NAME}: student predicts {student.num_classes} classes, the teacher "
                          f"{teacher_classes}; use the same classes (set student.num_classes and teacher.num_classes equal)")
    if similarity is None:
        similarity = student.similarity
    if similarity not in SIMILARITIES:
        raise ConfigError(f"kd.{NAME}.params.similarity '{similarity}' is unknown; use one of {', '.join(SIMILARITIES)}")
    if paths is None:
        paths = student.mimic_paths
    if isinstance(paths, str):
        paths = (paths,)
    paths = tuple(paths)
    if not paths or any(p not in student.mimic_paths for p in paths):
        raise ConfigError(f"kd.{NAME}.params.paths {list(paths)} must be a non-empty subset of the student's "
                          f"options.mimic_paths {list(student.mimic_paths)} (of {', '.join(MIMIC_PATHS)})")
    width = int(predictor.cls_score.in_features)
    if "reg" in paths and student.t_hidden != width:
        raise ConfigError(f"kd.{NAME}: the student's reg-path feature is {student.t_hidden}-d, the teacher's box "
                          f"head gives {width}-d; set student options.t_hidden: {width}")
    return ExternalTeacherMimic(similarity=similarity, paths=paths)
