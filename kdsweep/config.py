"""Typed, frozen experiment configuration.

Configuration flows down: YAML (data only) -> ``from_dict`` -> these dataclasses -> builders.
``from_dict`` is strict: an unknown key, a wrong type or a bad value raises :class:`ConfigError`
with one line naming the field and the fix.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

ARCHS = ("retinanet", "fcos", "fasterrcnn", "mimicdet")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "mobilenet_v3_small")


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line naming the field and the fix."""


@dataclass(frozen=True)
class DataConfig:
    """Where the detection data lives.

    ``root`` is a synth-layout folder (``train.json``, ``val.json``, ``images/``); or give
    ``train_ann``/``val_ann`` (COCO instances files) and ``images`` (their image folder).
    With neither, the embedded synthetic dataset under ``KDSWEEP_HOME`` is generated on first use
    with the ``synth_*`` settings (``synth_style``: ``cluttered``, VisDrone-like, or ``simple``,
    no distractors or occluders; see :mod:`kdsweep.data.synthetic`).
    """

    root: str | None = None
    train_ann: str | None = None
    val_ann: str | None = None
    images: str | None = None
    synth_train: int = 600
    synth_val: int = 150
    synth_size: int = 192
    synth_seed: int = 0
    synth_style: str = "cluttered"
    max_train_images: int | None = None
    max_val_images: int | None = None

    def __post_init__(self) -> None:
        if self.synth_style not in ("cluttered", "simple"):
            raise ConfigError(f"data.synth_style '{self.synth_style}' is unknown; use cluttered or simple")


@dataclass(frozen=True)
class ModelConfig:
    """A torchvision detector (RetinaNet, FCOS or Faster R-CNN) with an FPN backbone.

    ``num_classes`` counts object classes without background; 0 takes it from the dataset.
    ``weights``: None (random init, no network), a local checkpoint path, or
    ``torchvision:NAME`` for a torchvision weights enum name (needs internet).
    ``min_size``/``max_size`` set the input resolution (torchvision's transform).
    ``anchor_scale``: anchor (or FCOS/RPN reference) size = ``anchor_scale * stride`` per FPN level;
    torchvision's RetinaNet uses 4 (32 px at P3); small-object data wants 2.
    ``head_norm``: GroupNorm in RetinaNet's head towers (torchvision's RetinaNet v2 head); from
    scratch on small data it converges about twice as fast (``benchmarks/calibrate_student.py``).
    FCOS's head always has it; Faster R-CNN ignores it.
    ``rpn_proposals`` (Faster R-CNN only): proposals per image the RPN keeps after NMS, in training
    and inference (pre-NMS it keeps twice as many per level); None: torchvision's 2000 / 1000.
    ``roi_samples`` (Faster R-CNN only): proposals per image sampled for the R-CNN head's loss;
    None: torchvision's 512. At 128 px with a few objects per image, 300 / 128 train a step about
    2.3x faster on CPU than the defaults.
    ``options``: arch-specific settings, only for ``mimicdet`` (``staggered``, ``t_head``,
    ``mimic_weight``, ``similarity``, ``mimic_paths``, ... see :func:`kdsweep.methods.mimicdet.model.build_mimicdet`).
    ``upsample`` (1, 2, 4, ...): Li et al.'s cross-scale student: a learned deconvolution
    upsamples every FPN map by this factor as part of the network, in training and at inference
    (:mod:`kdsweep.models.cross_scale`); anchors shrink by the same factor. 1: none.
    """

    arch: str = "retinanet"
    backbone: str = "resnet18"
    fpn_channels: int = 64
    num_classes: int = 0
    min_size: int = 192
    max_size: int = 192
    weights: str | None = None
    trainable_backbone_layers: int = 5
    anchor_scale: float = 4.0
    head_norm: bool = False
    rpn_proposals: int | None = None
    roi_samples: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    upsample: int = 1

    def __post_init__(self) -> None:
        if self.upsample < 1 or self.upsample & (self.upsample - 1):
            raise ConfigError(f"model.upsample {self.upsample} must be 1 (none) or a power of 2 (e.g. 2: Li et al.'s deconvolution)")
        if self.upsample > 1 and self.arch == "mimicdet":
            raise ConfigError("model.upsample applies to retinanet, fcos and fasterrcnn, not mimicdet; use 1")
        finest = 4 if self.arch == "fasterrcnn" else 8  # the stride of the finest FPN level
        if self.upsample > finest // 2:
            raise ConfigError(f"model.upsample {self.upsample}: {self.arch}'s finest level has stride {finest}; "
                              f"use at most {finest // 2}")
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch '{self.arch}' is unknown; use one of {', '.join(ARCHS)}")
        if self.backbone not in BACKBONES:
            raise ConfigError(
                f"model.backbone '{self.backbone}' is unknown; use one of {', '.join(BACKBONES)}"
            )
        if self.fpn_channels <= 0 or self.min_size <= 0 or self.max_size < self.min_size:
            raise ConfigError(
                "model: fpn_channels and min_size must be > 0 and max_size >= min_size"
            )
        for name in ("rpn_proposals", "roi_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.{name} {value} must be >= 1 (or left out for torchvision's default)")


@dataclass(frozen=True)
class KDTermConfig:
    """One weighted distillation term: ``weight * TERMS[loss](spec)(step)`` (:mod:`kdsweep.methods`).

    ``levels``: FPN level names to match (None: every level both models have).
    ``adapter``: a learned 1x1 conv from student to teacher channels per level; ``auto``: one
    exactly when the two FPNs' widths differ (as PKD, CWD, MGD and FGD's code adds its ``align``).
    ``params``: keyword arguments of the loss (e.g. ``alpha``, ``window_size`` for ``ssim``).
    """

    loss: str
    weight: float = 1.0
    levels: tuple[str, ...] | None = None
    adapter: bool | str = False
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.adapter, bool) and self.adapter != "auto":
            raise ConfigError(f"kd.{self.loss}.adapter {self.adapter!r} is unknown; use true, false or auto")
        if self.weight < 0:
            raise ConfigError(f"kd.{self.loss}.weight {self.weight} is negative; use a weight >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and Ray Train scaling settings (batch size is per worker).

    ``freeze_backbone``: fraction of training during which the student's backbone body gets no
    update (ScaleKD freezes it for the first 10k of 90k iterations, about 0.11).
    ``placement_strategy``: Ray Train's placement of a run's workers (``STRICT_SPREAD``: one
    worker per node; ``auto``: ``STRICT_PACK`` when one node holds them all, else ``PACK``, see
    :func:`kdsweep.orchestrate.scheduling.placement`).
    ``amp``: mixed precision; ``amp_dtype`` ``auto`` is float16 with a GradScaler on CUDA and
    bfloat16 on the CPU (``float16`` or ``bfloat16`` to choose; KD terms always compute in float32).
    ``grad_clip``: max total gradient norm, or None (mmdetection's RetinaNet 1x, the papers'
    reference, has none: ``_base_/schedules/schedule_1x.py``, ``grad_clip=None``).
    ``init_student``: before the first step (not on a resume), copy every teacher neck (FPN) and
    head tensor whose name and shape match into the student (MGD's and FGD's ``init_student=True``,
    :mod:`kdsweep.models.init_student`); a student-run setting: it needs KD terms (a teacher).

    The data pipeline (:mod:`kdsweep.data.loader`):
    ``hflip``: probability of a random horizontal flip of a training image and its boxes (0: off;
    every paper trains with 0.5). Validation never flips.
    ``aspect_grouping``: batches hold images of one aspect-ratio bin, torchvision's detection
    references' ``create_aspect_ratio_groups(k)`` binning (``2 ** linspace(-1, 1, 2k + 1)``);
    0 turns it off. Less padding per batch, the same number of steps.
    ``loader_workers``: DataLoader worker processes per Ray Train worker; ``auto`` is the worker's
    CPUs minus one (``floor(cpus_per_worker) - 1``, so 0 on the CPU presets).
    ``eval_every``: COCO-evaluate every N epochs; the last epoch always is, and 0 evaluates the
    last epoch only. A sweep whose scheduler or searcher reads AP at every report evaluates every
    epoch whatever this says.
    ``evaluator``: ``pycocotools`` (the reference) or ``faster-coco-eval`` (the same six numbers,
    8x faster on 5,000 images: ``benchmarks/bench_eval.py``; :mod:`kdsweep.train.evaluation`).

    GPU speed options (no effect on the CPU; each changes kernels, so each is in the run's hash;
    ``benchmarks/gpu_check.py`` measures both, side by side):
    ``tf32``: float32 matmuls and cuDNN convolutions in TF32 (Ampere and later): the float32 parts
    of a step, the KD terms above all, run on tensor cores with a 10-bit mantissa. False (default)
    keeps them float32 (``torch.backends.cuda.matmul.allow_tf32`` and
    ``torch.backends.cudnn.allow_tf32`` both off; PyTorch's own default has cuDNN's on).
    ``channels_last``: the student's and the teacher's backbone and FPN in channels-last memory
    format, which tensor-core convolutions prefer under AMP.
    """

    epochs: int = 4
    batch_size: int = 8
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    lr_schedule: str = "cosine"
    grad_clip: float | None = 10.0
    num_workers: int = 1
    use_gpu: bool = False
    amp: bool = False
    amp_dtype: str = "auto"
    cpus_per_worker: float = 0.9
    threads_per_worker: int = 2
    seed: int = 0
    max_iters_per_epoch: int | None = None
    eval_batch_size: int = 8
    freeze_backbone: float = 0.0
    placement_strategy: str = "PACK"
    hflip: float = 0.5
    aspect_grouping: int = 3
    loader_workers: int | str = "auto"
    eval_every: int = 1
    evaluator: str = "pycocotools"
    init_student: bool = False
    tf32: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.evaluator not in ("pycocotools", "faster-coco-eval"):
            raise ConfigError(f"train.evaluator '{self.evaluator}' is unknown; use pycocotools or faster-coco-eval")
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"train.hflip {self.hflip} is a probability; use a value in [0, 1] (0 turns flipping off)")
        if self.aspect_grouping < 0:
            raise ConfigError(f"train.aspect_grouping {self.aspect_grouping} must be >= 0 (0 turns grouping off)")
        if self.loader_workers != "auto" and (not isinstance(self.loader_workers, int) or self.loader_workers < 0):
            raise ConfigError(f"train.loader_workers {self.loader_workers!r} must be auto or an integer >= 0")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every {self.eval_every} must be >= 0 (0: the last epoch only)")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD", "auto"):
            raise ConfigError(
                f"train.placement_strategy '{self.placement_strategy}' is unknown; use PACK, SPREAD, STRICT_PACK, "
                "STRICT_SPREAD or auto"
            )
        if self.amp_dtype not in ("auto", "float16", "bfloat16"):
            raise ConfigError(f"train.amp_dtype '{self.amp_dtype}' is unknown; use auto, float16 or bfloat16")
        if not 0.0 <= self.freeze_backbone <= 1.0:
            raise ConfigError(
                f"train.freeze_backbone {self.freeze_backbone} is a fraction of training; use a value in [0, 1]"
            )
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"train.optimizer '{self.optimizer}' is unknown; use sgd or adamw")
        if self.lr_schedule not in ("cosine", "step", "constant"):
            raise ConfigError(
                f"train.lr_schedule '{self.lr_schedule}' is unknown; use cosine, step or constant"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ConfigError("train: epochs, batch_size and num_workers must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr {self.lr} must be > 0")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole distillation run: data, teacher, student, KD terms and training settings.

    ``teacher_scale`` is the teacher's input resolution relative to the student's (ScaleKD's
    high-resolution teacher uses 2.0; Li et al.'s cross-scale mimic gives the student half the
    teacher's). The teacher is trained *and* run at that resolution: the student's
    ``min_size``/``max_size`` times ``student_scale`` times ``teacher_scale``
    (:func:`teacher_model`), which replaces the teacher's own ``min_size``/``max_size`` (the
    launcher says so when they differ); a teacher at 2x is another teacher, with its own config
    hash. Teacher
    feature maps are resized to the student's where a term compares maps.
    ``student_scale`` shrinks (or grows) the student's input: it runs at its ``min_size`` /
    ``max_size`` times this (:func:`student_model`), so a half-resolution row is half of every
    preset's resolution (Li et al.'s cross-scale student: 0.5, with ``teacher_scale`` 2 for a
    teacher at the preset's resolution).
    An empty ``kd`` trains the student alone (the baseline row).
    """

    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(backbone="resnet50", fpn_channels=64))
    student: ModelConfig = field(default_factory=ModelConfig)
    kd: tuple[KDTermConfig, ...] = ()
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_train: TrainConfig = field(default_factory=TrainConfig)
    teacher_scale: float = 1.0
    student_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.teacher_scale <= 0:
            raise ConfigError(f"teacher_scale {self.teacher_scale} must be > 0")
        if self.student_scale <= 0:
            raise ConfigError(f"student_scale {self.student_scale} must be > 0 (0.5: half the student's min_size/max_size)")
        if self.kd and self.teacher.upsample != 1:
            raise ConfigError("teacher.upsample: a teacher's maps are compared at its own strides; use 1 (upsample is "
                              "for Li et al.'s half-resolution student)")
        if self.teacher_train.init_student:
            raise ConfigError("teacher_train.init_student: a teacher has no teacher to start from; set it under train")
        if self.train.init_student and not self.kd:
            raise ConfigError("train.init_student copies the teacher's neck and head into the student: it needs kd "
                              "terms (a teacher); add a kd term or set init_student false")


def _scaled(model: ModelConfig, base: ModelConfig, scale: float) -> ModelConfig:
    """``model`` at ``base``'s ``min_size``/``max_size`` times ``scale`` (rounded, at least 1)."""
    if scale == 1.0 and (model.min_size, model.max_size) == (base.min_size, base.max_size):
        return model
    return dataclasses.replace(model, min_size=max(1, round(base.min_size * scale)), max_size=max(1, round(base.max_size * scale)))


def student_model(exp: ExperimentConfig) -> ModelConfig:
    """``exp.student`` at the resolution it is trained and run at: its sizes times ``student_scale``."""
    return _scaled(exp.student, exp.student, exp.student_scale)


def teacher_model(exp: ExperimentConfig) -> ModelConfig:
    """``exp.teacher`` at the resolution it is trained and run at: the student's ``min_size`` and
    ``max_size`` times ``student_scale * teacher_scale`` (rounded once, so a half-resolution
    student's 2x teacher is exactly the full-resolution one). ScaleKD: "the teacher sees a
    high-resolution input" (Zhu et al. 2023, METHODS.md section 3), so a 2x teacher is trained on
    2x images, not only fed them. At scale 1 with the student's sizes this is ``exp.teacher``."""
    return _scaled(exp.teacher, exp.student, exp.student_scale * exp.teacher_scale)


def teacher_experiment(exp: ExperimentConfig) -> ExperimentConfig:
    """The config of the run that trains ``exp``'s teacher: the teacher (:func:`teacher_model`, at
    its own resolution) as the student, trained with ``exp.teacher_train``, no KD terms, at scale
    1. A teacher's run is then a run like any other."""
    return dataclasses.replace(exp, student=teacher_model(exp), train=exp.teacher_train, kd=(), teacher_scale=1.0,
                               student_scale=1.0)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check/convert ``value`` to type hint ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of fields, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict, collections.abc.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Raises:
        ConfigError: one line, e.g. ``config.student.backbon is unknown; known fields: ...``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]} is unknown; known fields: {', '.join(names)}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:  # missing required field
        raise ConfigError(f"{where}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON-serialisable dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


HASH_NEUTRAL = {"TrainConfig": ("loader_workers", "eval_every", "evaluator")}
"""Fields that never change what a run learns (how data is loaded, when it is evaluated): left out
of :func:`run_hash_dict`, so that a teacher trained with other values is reused."""

LEGACY_VALUES = {"TrainConfig": {"hflip": 0.0, "aspect_grouping": 0, "init_student": False, "tf32": False,
                                  "channels_last": False},
                 "ModelConfig": {"upsample": 1}}
"""Fields added after teachers were first stored, with the value that reproduces the earlier
behaviour: at that value they are left out of :func:`run_hash_dict`, so that stores of earlier versions
keep their teachers."""


def run_hash_dict(cfg: Any) -> dict[str, Any]:
    """``to_dict(cfg)`` without the :data:`HASH_NEUTRAL` fields and the :data:`LEGACY_VALUES` at
    their legacy value (``cfg`` a config dataclass)."""
    data = to_dict(cfg)
    name = type(cfg).__name__
    for key in HASH_NEUTRAL.get(name, ()):
        data.pop(key, None)
    for key, legacy in LEGACY_VALUES.get(name, {}).items():
        if data.get(key) == legacy:
            data.pop(key)
    return data


def config_hash(cfg: Any) -> str:
    """Stable 12-hex-digit hash of a config (used to reuse a finished teacher run)."""
    data = cfg if isinstance(cfg, Mapping) else to_dict(cfg)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
