"""Distiller: frozen teacher + one trainable module (student and KD terms) -> dict of losses.

Total loss ``L = L_det + sum_i lambda_i * L_i`` (see ``/work/shared/METHODS.md``): the detector's
own losses as torchvision names them, plus one ``kd_<name>`` entry per term, already weighted.

Layout (as timm's distillation task): the teacher is frozen and kept *outside* the module tree,
so ``state_dict()``, ``parameters()``, optimisers and DDP never see it; everything that trains
sits in ``distiller.trainable`` (a :class:`Trainable`), which is what the training code hands to
``ray.train.torch.prepare_model`` via :meth:`Distiller.wrap`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

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


class HostSyncBatchNorm(_BatchNorm):
    """Synchronised BatchNorm for host (CPU, gloo) tensors: what :func:`sync_batchnorm` converts to
    on a CPU run (on GPUs it converts to torch's ``nn.SyncBatchNorm``).

    torch's own cannot run there: its forward raises ``SyncBatchNorm expected input tensor to be
    on GPU ...`` for a CPU input once a process group exists, and DDP refuses to wrap it on the
    CPU ("SyncBatchNorm layers only work with GPU modules"; torch 2.14). So CPU runs with several
    workers, and the tests' two-worker gloo runs, use this layer: the same statistics as torch's,
    all-reduced over the default group. Parameters, buffers and ``state_dict`` keys are
    ``nn.BatchNorm2d``'s. In eval mode, or with one rank, it is a plain BatchNorm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return self._synced(input)
        return super().forward(input)

    def _synced(self, x: Tensor) -> Tensor:
        """Batch statistics over every rank's batch (Ioffe & Szegedy 2015, Algorithm 1 over the
        global batch, as torch's CUDA SyncBatchNorm and Peng et al.'s MegDet CGBN).

        Args:
            x: (N_r, C, *) this rank's input; N_r may differ between ranks.
        Returns:
            (N_r, C, *) ``(x - mu) / sqrt(var + eps) * weight + bias``, where ``mu`` and the biased
            ``var`` (C,) are over all ranks' ``sum_r N_r * prod(*)`` values per channel, computed
            in float32 (two all-reduces: the mean, then the centred squares) and returned in
            ``x``'s dtype. ``running_var`` gets the unbiased variance, as torch's. Gradients flow
            through both all-reduces (``torch.distributed.nn.functional``: the backward of a sum
            is the sum of every rank's gradient), so each rank's input gradient is its slice of one
            BatchNorm's over the concatenated global batch.
        """
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float()
        local = xf.numel() // xf.shape[1]
        # the element count travels with the sums (ranks may hold different batch sizes); made
        # from x, so it lives on x's device as every collective's tensor must
        sums = all_reduce(torch.cat([xf.sum(dims), xf.new_full((1,), float(local))]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = xf - mean.view(shape)
        var = all_reduce(centred.pow(2).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device_type: str, exclude: Iterable[nn.Module] = ()) -> tuple[nn.Module, int]:
    """Replace every trainable BatchNorm under ``module`` by a synchronised one, in place:
    torch's ``nn.SyncBatchNorm`` (what ``nn.SyncBatchNorm.convert_sync_batchnorm`` builds) for a
    ``device_type`` other than ``"cpu"``, :class:`HostSyncBatchNorm` for ``"cpu"``.

    *Trainable* BatchNorm is any ``nn.BatchNorm1d/2d/3d`` (its statistics update in train mode,
    whatever ``requires_grad`` says); torchvision's ``FrozenBatchNorm2d`` (ImageNet backbones) is
    not one and stays. Parameters (the same ``nn.Parameter`` objects), running statistics, the
    batch counter and the training flag carry over, so the state_dict keeps its keys and values
    (checkpoints load either way). Modules in ``exclude`` (the frozen teacher) are neither
    converted nor entered.

    Why: with 2 images per GPU each rank's BatchNorm normalises by the statistics of its 2 images
    and DDP broadcasts rank 0's running statistics every step; from-scratch training needs the
    global batch's (He et al., "Rethinking ImageNet Pre-training", ICCV 2019: SyncBN or GroupNorm).

    Returns:
        ``(module, n)``: the module (a new one when ``module`` itself is a BatchNorm) and the
        number of layers converted.
    """
    skip = {id(m) for m in exclude}
    return _sync_batchnorm(module, HostSyncBatchNorm if device_type == "cpu" else nn.SyncBatchNorm, skip)


def _sync_batchnorm(module: nn.Module, kind: type[_BatchNorm], skip: set[int]) -> tuple[nn.Module, int]:
    if id(module) in skip:
        return module, 0
    if isinstance(module, _BatchNorm) and not isinstance(module, (nn.SyncBatchNorm, HostSyncBatchNorm)):
        out = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
        return out, 1
    converted = 0
    for name, child in module.named_children():
        new, n = _sync_batchnorm(child, kind, skip)
        if new is not child:
            module.add_module(name, new)
        converted += n
    return module, converted


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

    def rewrap(self, fn: Callable[[nn.Module], nn.Module]) -> "Distiller":
        """Wrap the trainable part again with ``fn`` after its parameters' ``requires_grad``
        changed (the frozen backbone's span starting or ending), when it is DDP-wrapped (it has a
        ``module``); otherwise nothing. DDP records the parameters that require gradients when it
        wraps: a parameter frozen afterwards leaves its bucket waiting forever ("Expected to have
        finished reduction"), one thawed afterwards would train without its gradients ever being
        averaged. Every worker must call it at the same step (DDP's wrapping broadcasts rank 0's
        parameters and buffers). The old wrapper's reducer hooks stay inert: they act only after
        a forward through it."""
        inner = getattr(self.trainable, "module", None)
        if inner is not None:
            self.trainable = fn(inner)
        return self

    def channels_last(self) -> int:
        """The student's and the teacher's backbone (body and FPN) in channels-last memory format,
        in place (``TrainConfig.channels_last``); call before :meth:`wrap` and before building
        the optimiser. Returns the number of 4-d parameters converted."""
        converted = 0
        for model in (self.student, self.teacher):
            if model is None or not hasattr(model, "backbone"):
                continue
            converted += sum(p.dim() == 4 for p in model.backbone.parameters())
            model.backbone.to(memory_format=torch.channels_last)
        return converted

    def sync_batchnorm(self, device: torch.device | str) -> int:
        """Convert the trainable part's BatchNorm to synchronised BatchNorm for ``device``
        (:func:`sync_batchnorm`: ``nn.SyncBatchNorm`` on GPUs, :class:`HostSyncBatchNorm` on
        the CPU), never the teacher's; call before :meth:`wrap` and before building the optimiser.

        The worker calls it for every run with more than one worker (``kdsweep.train.worker``):
        from-scratch students (``weights: null``) then normalise over the global batch. Returns
        the number of layers converted (0 for ImageNet backbones, whose FrozenBatchNorm2d stays,
        with GroupNorm or norm-free heads).
        """
        if self.trainable is not self._inner:
            raise RuntimeError("Distiller.sync_batchnorm: call it before wrap() (DDP records the modules it wraps)")
        exclude = self.teacher.modules() if self.teacher is not None else ()
        _, converted = sync_batchnorm(self.trainable, torch.device(device).type, exclude)
        return converted

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
