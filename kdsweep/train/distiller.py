"""Distiller: frozen teacher + one trainable module (student and KD terms) -> dict of losses.

Total loss ``L = L_det + sum_i lambda_i * L_i`` (see ``/work/shared/METHODS.md``): the detector's
own losses as torchvision names them, plus one ``kd_<name>`` entry per term, already weighted.

Layout (as timm's distillation task): the teacher is frozen and kept *outside* the module tree,
so ``state_dict()``, ``parameters()``, optimisers and DDP never see it; everything that trains
sits in ``distiller.trainable`` (a :class:`Trainable`), which is what the training code hands to
``ray.train.torch.prepare_model`` via :meth:`Distiller.wrap`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from kdsweep.config import ConfigError, ExperimentConfig, KDTermConfig, ModelConfig, student_model, teacher_model
from kdsweep.kd.precision import autocast_off, to_float32
from kdsweep.kd.step import KDStep, StepTap, TeacherOutputs, teacher_outputs
from kdsweep.kd.term import KDTerm, Need
from kdsweep.methods import build_term
from kdsweep.models.detectors import build_detector, level_names
from kdsweep.models.taps import FeatureTap

Terms = Mapping[str, tuple[float, KDTerm]]
Levels = Sequence[str] | Mapping[str, Sequence[str]] | None


class Trainable(nn.Module):
    """The student and every KD term (with its adapters): the one module that trains.

    Every parameter here gets a gradient in every KD training step (the terms run on every step
    with their adapters), so DDP needs ``find_unused_parameters=True`` only if a loss term has
    parameters it does not use on some step (or parts of the student are skipped).

    Args:
        student: a torchvision detector.
        terms: ``name -> (weight, term)``, each a :class:`~kdsweep.kd.term.KDTerm`.
        levels: ``name -> canonical levels`` the term compares, in order.
        teacher_scale: teacher resolution / student resolution (for ``KDStep.aligned``).
    """

    def __init__(
        self,
        student: nn.Module,
        terms: Terms,
        levels: Mapping[str, Sequence[str]],
        teacher_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.terms = nn.ModuleDict({name: module for name, (_, module) in terms.items()})
        self.weights = {name: float(weight) for name, (weight, _) in terms.items()}
        self.levels = {name: tuple(levels[name]) for name in terms}
        self.teacher_scale = teacher_scale
        for name, term in self.terms.items():
            if not isinstance(term, KDTerm):
                raise TypeError(f"kd term {name!r} is a {type(term).__name__}, not a kdsweep.kd.term.KDTerm")

    @property
    def needed_levels(self) -> tuple[str, ...]:
        """Union of every term's levels, in student level order."""
        wanted = {lv for levels in self.levels.values() for lv in levels}
        return tuple(name for name in level_names(self.student).values() if name in wanted)

    @property
    def needs(self) -> frozenset[Need]:
        """Union of what the terms read of a step (:attr:`KDTerm.needs`): the hooks to install."""
        return frozenset(need for term in self.terms.values() for need in term.needs)

    @property
    def taps(self) -> tuple[str, ...]:
        """Union of the student submodules the terms read (:attr:`KDTerm.taps`), in first-seen order."""
        return tuple(dict.fromkeys(path for term in self.terms.values() for path in term.taps))

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        teacher_out: TeacherOutputs | Mapping[str, Tensor] | None = None,
        progress: float = 0.0,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Student step plus weighted KD terms.

        Args:
            images: N images (3, H_i, W_i) in [0, 1].
            targets: per image ``boxes`` (n, 4) xyxy and ``labels`` (n,) in 1..K (train mode).
            teacher_out: the teacher's :class:`~kdsweep.kd.step.TeacherOutputs` (or just its
                ``{"p3": (N, C_t, h, w), ...}`` maps), computed without grad.
            progress: fraction of training done, in [0, 1] (the terms' schedules).
        Returns:
            Train mode: torchvision's loss dict plus ``kd_<name>`` = weight * term for each term
            (a term returning a dict of parts gives ``kd_<name>_<part>``, each times the weight).
            Eval mode: the student's detections.
        """
        if not self.training or not self.terms or teacher_out is None:
            return self.student(images, targets)
        if not isinstance(teacher_out, TeacherOutputs):
            teacher_out = TeacherOutputs(feats=dict(teacher_out))
        needs = self.needs
        with FeatureTap(self.student, levels=self.needed_levels) as tap, StepTap(self.student, needs, self.taps) as step_tap:
            losses = self.student(images, targets)
        student_feats = tap.pop()
        # KD terms compute in float32 whatever autocast the step runs under: their inputs are
        # promoted and autocast is off inside (half-precision statistics such as SSIM's local
        # variances or a softmax over a whole map lose too much).
        with autocast_off(images[0].device.type):
            student_feats = to_float32(student_feats)
            teacher_out = to_float32(teacher_out)
            for name, term in self.terms.items():
                step = KDStep(
                    student=self.student, teacher=self.__dict__.get("teacher_ref"), student_feats=student_feats,
                    teacher_out=teacher_out, levels=self.levels[name], teacher_scale=self.teacher_scale,
                    progress=float(progress),
                )
                out = term(to_float32(step_tap.fill(step)))
                weight = self.weights[name]
                if isinstance(out, Mapping):
                    for part, value in out.items():
                        losses[f"kd_{name}_{part}"] = weight * value
                else:
                    losses[f"kd_{name}"] = weight * out
        return losses


def _shared_levels(student: nn.Module, teacher: nn.Module) -> tuple[str, ...]:
    teacher_levels = set(level_names(teacher).values())
    return tuple(name for name in level_names(student).values() if name in teacher_levels)


def _resolve_levels(terms: Terms, levels: Levels, shared: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Per-term levels: ``levels`` (shared by all terms, or per term name), default every shared one.

    Raises:
        ConfigError: no shared level, or a requested level that is not in both models.
    """
    if not shared:
        raise ConfigError("kd: teacher and student share no FPN level; pick archs with common levels")
    out = {}
    for name in terms:
        chosen = levels.get(name) if isinstance(levels, Mapping) else levels
        chosen = tuple(chosen) if chosen is not None else tuple(shared)
        missing = [lv for lv in chosen if lv not in shared]
        if missing or not chosen:
            raise ConfigError(
                f"kd.{name}.levels {list(chosen)}: {missing or 'empty'} not shared by teacher and student; "
                f"use some of {list(shared)}"
            )
        out[name] = chosen
    return out


def freeze(teacher: nn.Module) -> nn.Module:
    """``eval()`` and ``requires_grad_(False)``, in place."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class Distiller(nn.Module):
    """Frozen teacher + :class:`Trainable` -> ``{detection losses..., kd_<name>: weighted term}``.

    With no teacher or no terms it is a plain student step (baseline and teacher training).

    Args:
        student: a torchvision detector (see :func:`kdsweep.models.detectors.build_detector`).
        teacher: a torchvision detector; frozen, in eval mode, run under ``no_grad``, and not a
            submodule (not in ``state_dict``/``parameters``; ``train()`` leaves it in eval).
            Its class count may differ from the student's: only FPN features are compared.
        terms: ``name -> (weight, term)``, already built (e.g. by :func:`kdsweep.methods.build_term`).
        levels: canonical levels the terms compare (one list for all, or per term name);
            default every level both models have.
        teacher_scale: teacher input resolution / student's (ScaleKD); teacher maps are resized
            to the student's size by :func:`kdsweep.models.taps.align_to`. None: whole-map resize.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        terms: Terms | None = None,
        levels: Levels = None,
        *,
        teacher_scale: float | None = None,
    ) -> None:
        super().__init__()
        terms = dict(terms or {})
        if terms and teacher is None:
            raise ConfigError("kd terms need a teacher; give one or drop the kd terms")
        per_term = _resolve_levels(terms, levels, _shared_levels(student, teacher)) if terms else {}
        self.trainable: nn.Module = Trainable(student, terms, per_term, teacher_scale)
        # context terms may run teacher parts (heads on student proposals); a plain reference
        self.trainable.__dict__["teacher_ref"] = teacher
        # Plain attribute, not a submodule: invisible to state_dict, parameters(), train() and DDP.
        self.__dict__["_teacher"] = freeze(teacher) if teacher is not None else None

    # ----------------------------------------------------------------------------- accessors
    @property
    def teacher(self) -> nn.Module | None:
        return self.__dict__["_teacher"]

    @property
    def _inner(self) -> Trainable:
        """``self.trainable`` without a DDP-style wrapper."""
        return getattr(self.trainable, "module", self.trainable)

    @property
    def student(self) -> nn.Module:
        """The unwrapped student (for evaluation and checkpointing)."""
        return self._inner.student

    @property
    def has_kd(self) -> bool:
        return self.teacher is not None and len(self._inner.terms) > 0

    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> "Distiller":
        """Replace ``trainable`` by ``fn(trainable)``, e.g. ``ray.train.torch.prepare_model``.

        ``prepare_model`` moves only ``trainable``; the teacher follows the images' device on the
        first forward (or call ``distiller.to(device)`` before wrapping).
        """
        self.trainable = fn(self.trainable)
        return self

    # ------------------------------------------------------------------------- module state
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "Distiller":
        """``to()``/``cuda()``/``half()``... reach the teacher too."""
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def extra_repr(self) -> str:
        name = type(self.teacher).__name__ if self.teacher is not None else None
        return f"teacher={name} (frozen, not a submodule)"

    # ------------------------------------------------------------------------------ forward
    @torch.no_grad()
    def teacher_features(self, images: list[Tensor]) -> dict[str, Tensor]:
        """Teacher FPN maps ``{"p3": (N, C_t, h, w), ...}`` for the levels the terms use."""
        return self.teacher_outputs(images).feats

    @torch.no_grad()
    def teacher_outputs(self, images: list[Tensor]) -> TeacherOutputs:
        """What the terms need of the teacher (:func:`kdsweep.kd.step.teacher_outputs`)."""
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("Distiller.teacher_outputs: this Distiller has no teacher")
        param = next(teacher.parameters(), None)
        if param is not None and param.device != images[0].device:
            teacher.to(images[0].device)
        teacher.eval()
        inner = self._inner
        return teacher_outputs(teacher, images, inner.needed_levels, inner.needs)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, progress: float = 0.0
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """One step: teacher features (train mode with KD only) then ``self.trainable``.

        Args:
            images: N images (3, H_i, W_i) in [0, 1]; the teacher gets the same images (its
                transform resizes them to its own resolution).
            targets: per image ``boxes`` (n, 4) xyxy, ``labels`` (n,) in 1..K.
        Returns:
            Train mode: ``{"classification": ..., "bbox_regression": ..., "kd_l2": ...}`` (detection
            keys as torchvision names them). Eval mode: the student's detections.
        """
        if not (self.training and self.has_kd):
            return self.trainable(images, targets)
        return self.trainable(images, targets, self.teacher_outputs(images), progress)


# -------------------------------------------------------------------------------- from config
def term_names(kd: Sequence[KDTermConfig]) -> list[str]:
    """``<loss>``, or ``<loss>_<i>`` (i-th occurrence, from 0) when a loss appears more than once."""
    counts: dict[str, int] = {}
    for term in kd:
        counts[term.loss] = counts.get(term.loss, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for term in kd:
        if counts[term.loss] == 1:
            names.append(term.loss)
        else:
            names.append(f"{term.loss}_{seen.get(term.loss, 0)}")
            seen[term.loss] = seen.get(term.loss, 0) + 1
    return names


def set_teacher_resolution(teacher: nn.Module, model: ModelConfig) -> None:
    """Teacher transform sizes = ``model``'s (:func:`~kdsweep.config.teacher_model`), in place."""
    teacher.transform.min_size = (model.min_size,)
    teacher.transform.max_size = model.max_size


def build_distiller(cfg: ExperimentConfig, num_classes: int, teacher: nn.Module | None) -> Distiller:
    """Student from ``cfg.student`` at its resolution (:func:`~kdsweep.config.student_model`), KD
    terms from ``cfg.kd`` via :func:`kdsweep.methods.build_term`.

    The teacher (already built and loaded by the caller) gets its transform resolution set to the
    one it was trained at (:func:`~kdsweep.config.teacher_model`; in place). Empty ``cfg.kd``: a plain student (the
    teacher, if given, is not kept and never run).

    Raises:
        ConfigError: kd terms without a teacher, or levels not shared by both models.
    """
    student = build_detector(student_model(cfg), num_classes)
    if not cfg.kd:
        return Distiller(student)
    if teacher is None:
        raise ConfigError("kd terms need a teacher; give one or drop the kd terms")
    set_teacher_resolution(teacher, teacher_model(cfg))
    names = term_names(cfg.kd)
    shared = _shared_levels(student, teacher)
    levels = _resolve_levels(dict.fromkeys(names), {n: t.levels for n, t in zip(names, cfg.kd)}, shared)
    terms = {
        name: (term.weight, build_term(term, name=name, levels=levels[name], student=student, teacher=teacher, index=i))
        for i, (name, term) in enumerate(zip(names, cfg.kd))
    }
    return Distiller(student, teacher, terms, levels, teacher_scale=cfg.teacher_scale)
