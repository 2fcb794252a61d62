"""ScaleKD's two KD terms on the kdsweep path: ``sdf`` and ``csa`` (registry keys).

Reference:
    Zhu et al., "ScaleKD: Distilling Scale-Aware Knowledge in Small Object Detector", CVPR 2023.
    Total loss ``L = L_det + alpha * L_feat + beta * L_cls + gamma * L_bbox``; ``alpha`` is the
    ``sdf`` entry's ``weight``, ``beta``/``gamma`` are ``csa`` params. Defaults per detector type
    (secondary sources, see METHODS.md): one-stage (0.01, 0.2, 0.05), two-stage (0.07, 0.5, 0.2)
    in :data:`SCALEKD_DEFAULTS`.

Both read more of the step than matched FPN maps (their :attr:`~kdsweep.kd.term.KDTerm.needs`).

* ``sdf`` (:class:`SDFTerm`): scale-decoupled feature distillation
  (:class:`~kdsweep.methods.scalekd.sdf.SDFLoss`) on the last backbone stage (``source: body``, the
  paper's embedding Z; default) or on the configured FPN levels (``source: fpn``).
* ``csa`` (:class:`CSATerm`): the cross-scale assistant
  (:class:`~kdsweep.methods.scalekd.csa.CrossScaleAssistant`), one multi-scale cross-attention layer per
  student level (queries and values from the student, keys from the teacher); the student's own
  head, shared, predicts from the attended features (``head: own``: a head of the assistant's
  own; the two readings of the write-up are in :mod:`~kdsweep.methods.scalekd.csa`). It returns
  three parts:

  - ``assist``: the assistant's detection loss against ground truth, computed by the student's
    own ``compute_loss`` (same anchors, matcher and focal/L1 losses). The student maps are
    detached on the way in, so this trains only the assistant;
  - ``cls`` = ``beta * L_cls`` and ``bbox`` = ``gamma * L_bbox``: the student's dense head
    distilled from the assistant's (detached) outputs, see
    :func:`~kdsweep.methods.scalekd.csa.csa_distill_losses`. These train only the student. Like the
    detection loss they are normalised by the number of positive anchors of the student's own
    matching (our reading: the paper gives no normaliser; see there).

  Before ``start`` (a fraction of training; ScaleKD warms the student up for 30k of 90k
  iterations, ~0.33) all three parts are multiplied by 0: the assistant is still computed, so
  every parameter takes part in every step (DDP needs no ``find_unused_parameters``). The
  assistant's parameters have their own optimizer (``own_optimizer``: Adam, lr 3e-4, wd 1e-4),
  which steps from ``start`` on (:meth:`CSATerm.steps_at`): before it the assistant is untouched.
  ``csa`` needs a RetinaNet or FCOS student (its loss supervises the assistant; the paper reports
  both) and every student level.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet

from kdsweep.config import ConfigError
from kdsweep.kd.step import KDStep, body_channels
from kdsweep.kd.term import KDTerm, Need, TermSpec, reject_unknown
from kdsweep.methods.scalekd.csa import HEADS, CrossScaleAssistant, anchor_matches, csa_distill_losses
from kdsweep.methods.scalekd.sdf import SDFLoss

SCALEKD_DEFAULTS: dict[str, dict[str, float]] = {
    "one_stage": {"alpha": 0.01, "beta": 0.2, "gamma": 0.05},
    "two_stage": {"alpha": 0.07, "beta": 0.5, "gamma": 0.2},
}


def detector_kind(model: nn.Module | None) -> str:
    """``two_stage`` for a model with an RPN (Faster R-CNN), else ``one_stage``."""
    return "two_stage" if model is not None and hasattr(model, "rpn") else "one_stage"


class SDFTerm(SDFLoss, KDTerm):
    """``sdf``: :class:`~kdsweep.methods.scalekd.sdf.SDFLoss` on the backbone embedding or FPN levels.

    Shape:
        ``source="body"``: the last backbone stages ``(N, C_body_s, H/32, W/32)`` and
        ``(N, C_body_t, h/32, w/32)`` (the teacher's is resized to the student's); ``"fpn"``: the
        term's levels, as the feature terms get them. Output ``()``.
    """

    def __init__(self, *, source: str = "body", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.needs = frozenset({Need.BODY}) if source == "body" else frozenset()

    def forward(self, step: KDStep) -> Tensor:  # type: ignore[override]
        if self.source == "body":
            if step.student_body is None or step.teacher_out.body is None:
                raise RuntimeError("kd.sdf: the backbone embeddings were not captured")
            return self.compare([step.student_body], [step.teacher_out.body])
        return self.compare(*step.aligned())


def build_sdf(spec: TermSpec) -> SDFTerm:
    """Registry builder of ``sdf``; ``source`` is ``body`` (default, the paper's) or ``fpn``."""
    params = dict(spec.params)
    source = params.pop("source", "body")
    if source not in ("body", "fpn"):
        raise ConfigError(f"kd.sdf.params.source '{source}' is unknown; use body or fpn")
    channels = (spec.student_channels, spec.teacher_channels, spec.num_levels)
    if source == "body":
        channels = (body_channels(spec.student), body_channels(spec.teacher), 1)
    return SDFTerm(source=source, student_channels=channels[0], teacher_channels=channels[1], num_levels=channels[2],
                   adapter=spec.adapter, **params)


class CSATerm(KDTerm):
    """``csa``: ScaleKD's cross-scale assistant (see the module docstring for what trains how).

    Args:
        student_channels, teacher_channels, num_levels: FPN channels; every student level.
        num_anchors, num_classes: of the student's RetinaNet or FCOS head (the assistant's head matches).
        num_heads, ratios: attention heads, grouped by key/value downsample ratio.
        beta, gamma: weights of ``L_cls`` and ``L_bbox`` (default: :data:`SCALEKD_DEFAULTS`).
        temperature: of the classification distillation.
        start: fraction of training before the assistant joins.
        lr, weight_decay: the assistant's Adam (:meth:`own_optimizer`).
        num_convs: conv layers in each of the assistant's branches.
        query: ``student`` (default: "Q_i = F_S W_i^Q", the paper's equations) or ``teacher`` (the
            write-up's prose: "F_T is projected to Q and K"); see :mod:`~kdsweep.methods.scalekd.csa`.
        head: ``student`` (default: "we also supervise [the CSA] through a shared detection head"):
            the student's head, its weights detached, predicts from the attended features, so the
            assistant is the attention layers alone; or ``own``: "two independent classification
            and regression branches supervised by the ground truth", a head of its own.

    Shape:
        ``forward(step)`` reads ``step.aligned()`` (levels (N, C, H_l, W_l)), ``step.head_outputs``,
        ``step.anchors`` and ``step.targets``; returns ``{"assist": (), "cls": (), "bbox": ()}``.
    """

    needs = frozenset({Need.TARGETS, Need.HEAD})

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        num_anchors: int,
        num_classes: int,
        num_heads: int = 4,
        ratios: tuple[int, ...] = (1, 2, 4, 8),
        beta: float = 0.2,
        gamma: float = 0.05,
        temperature: float = 1.0,
        start: float = 0.0,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        num_convs: int = 2,
        query: str = "student",
        head: str = "student",
        detector: str = "retinanet",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"kd.csa.params.head '{head}' is unknown; use own (the paper's independent branches) or student")
        for key, value in (("beta", beta), ("gamma", gamma), ("lr", lr), ("weight_decay", weight_decay)):
            if not value >= 0:
                raise ConfigError(f"kd.csa.params.{key} {value} must be >= 0")
        if not 0.0 <= start < 1.0:
            raise ConfigError(f"kd.csa.params.start {start} is a fraction of training; use a value in [0, 1)")
        if not temperature > 0:
            raise ConfigError(f"kd.csa.params.temperature {temperature} must be > 0")
        self.assistant = CrossScaleAssistant(
            student_channels, teacher_channels, num_levels, num_anchors, num_classes,
            num_heads=num_heads, ratios=tuple(ratios), num_convs=num_convs, query=query, own_head=head == "own",
            detector=detector,
        )
        self.head, self.detector = head, detector
        self.beta, self.gamma, self.temperature, self.start = float(beta), float(gamma), float(temperature), float(start)
        self.lr, self.weight_decay = float(lr), float(weight_decay)

    def own_optimizer(self) -> torch.optim.Optimizer:
        """The assistant's Adam (lr 3e-4, weight decay 1e-4 by default), at a constant rate."""
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr,
                                weight_decay=self.weight_decay)

    def steps_at(self, progress: float) -> bool:
        """The assistant's Adam steps from ``start`` on, not before: before it the assistant's losses
        are multiplied by 0, and a step would still move every weight (Adam's update of a zero
        gradient with weight decay 1e-4 is about ``lr * sign(w)``: the weights shrink by ~35 % over
        the quick warm-up, ~93 % over 1,000 steps). The assistant joins as it was initialised, as
        ScaleKD's warm-up of the student alone implies (30k of 90k iterations before distilling)."""
        return progress >= self.start

    def forward(self, step: KDStep) -> dict[str, Tensor]:
        if step.head_outputs is None or step.anchors is None or step.targets is None:
            raise RuntimeError("kd.csa: the student's head outputs, anchors and targets were not captured")
        students, teachers = step.aligned()
        if self.head == "own":
            assist_out = self.assistant([s.detach() for s in students], teachers)
        else:  # the student's head on the attended features, its weights detached: it trains the attention only
            head = step.student.head
            frozen = {name: p.detach() for name, p in head.named_parameters()}
            features = self.assistant.features([s.detach() for s in students], teachers)
            assist_out = torch.func.functional_call(head, frozen, (features,))
        # torchvision's own matching (FCOS's also takes the points per level, one per position);
        # the assistant's loss is then the student's compute_loss, and the positives normalise L_cls/L_bbox
        per_level = [s.shape[-2] * s.shape[-1] for s in students]
        matched = anchor_matches(step.student, step.targets, step.anchors, per_level)
        det = step.student.head.compute_loss(step.targets, assist_out, step.anchors, matched)
        loss_cls, loss_box = csa_distill_losses(step.head_outputs, assist_out, torch.stack(matched) >= 0,
                                                per_image=self.detector != "fcos", temperature=self.temperature)
        join = 1.0 if step.progress >= self.start else 0.0
        return {
            "assist": join * sum(det.values()),
            "cls": join * self.beta * loss_cls,
            "bbox": join * self.gamma * loss_box,
        }


def build_csa(spec: TermSpec) -> CSATerm:
    """Registry builder of ``csa`` (``adapter`` is not used: attention projects channels itself)."""
    student = spec.student
    if not isinstance(student, (RetinaNet, FCOS)):
        raise ConfigError(f"kd.csa needs a RetinaNet or FCOS student (its loss supervises the assistant), got "
                          f"{type(student).__name__}; use student.arch: retinanet or fcos")
    levels = len(student.anchor_generator.sizes)
    if spec.num_levels != levels:
        raise ConfigError(f"kd.csa uses every student level ({levels}); drop kd.csa.levels")
    defaults = SCALEKD_DEFAULTS[detector_kind(student)]
    params = dict(spec.params)
    known = sorted({"num_heads", "ratios", "temperature", "start", "lr", "weight_decay", "num_convs", "query", "head"})
    reject_unknown("csa", params, ("beta", "gamma", *known))
    beta, gamma = params.pop("beta", None), params.pop("gamma", None)
    return CSATerm(
        student_channels=spec.student_channels, teacher_channels=spec.teacher_channels, num_levels=spec.num_levels,
        num_anchors=student.anchor_generator.num_anchors_per_location()[0],
        num_classes=student.head.classification_head.num_classes,
        beta=defaults["beta"] if beta is None else beta, gamma=defaults["gamma"] if gamma is None else gamma,
        detector="fcos" if isinstance(student, FCOS) else "retinanet", **params,
    )


__all__ = ["CSATerm", "SCALEKD_DEFAULTS", "SDFTerm", "build_csa", "build_sdf", "detector_kind"]
