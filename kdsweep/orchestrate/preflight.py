"""Preflight: build every trial's teacher and student exactly as the trials will, before anything
starts.

A trial builds its models in :func:`kdsweep.train.model.build_model`: the teacher's run builds the
teacher from its config (initial weights included: its run is ``teacher_experiment(exp)``), each
student run builds the student, its KD terms and the frozen teacher, loaded with the trained
teacher's state_dict. The preflight calls
that same function for every row (and every grid or choice value of the space), with two changes
that keep it cheap and offline:

* everything is built on the ``meta`` device: full-size models (RetinaNet R101 at 800x1333, the
  ``paper`` preset) cost neither memory nor initialisation time, while every shape, every
  ``load_state_dict`` and every probe forward still runs;
* a torchvision weights download (``WeightsEnum.get_state_dict``) returns a state_dict of the
  right shape instead (:func:`offline_weights`): the model the weights enum belongs to, built
  without weights. The state_dict the student run loads is the teacher's own, as in a trial.

So a model option, a weights name a model rejects, a checkpoint of another architecture, a KD
term parameter or a teacher/student mismatch fails here, in one line naming the file, the row and
the field, instead of in the first trial after the teacher's hours of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torchvision.models import get_model, get_model_builder, get_model_weights, list_models
from torchvision.models._api import WeightsEnum

from kdsweep.config import ConfigError, ExperimentConfig, ModelConfig, config_hash, student_model, teacher_experiment, teacher_model, to_dict
from kdsweep.data.synthetic import CLASSES
from kdsweep.models.detectors import TORCHVISION_PREFIX, check_checkpoint, describe
from kdsweep.train.model import build_model

__all__ = ["RowModels", "dataset_classes", "describe_row", "offline_weights", "preflight"]


# ------------------------------------------------------------------------------ offline weights
def _enum_model(enum: WeightsEnum) -> str:
    """The torchvision model name whose weights enum ``enum`` is (e.g. ``resnet50``)."""
    for name in list_models():
        try:
            if get_model_weights(name) is type(enum):
                return name
        except (ValueError, KeyError):  # pragma: no cover - models without weights
            continue
    raise ConfigError(f"torchvision weights {enum} belong to no torchvision model")  # pragma: no cover


def _shaped_state(enum: WeightsEnum) -> dict[str, torch.Tensor]:
    """A state_dict with the keys and shapes of ``enum``'s weights: its model, built without
    weights (on the current default device: ``meta`` inside :func:`preflight`)."""
    name = _enum_model(enum)
    kwargs: dict[str, Any] = {"weights": None}
    categories = enum.meta.get("categories")
    if categories:
        kwargs["num_classes"] = len(categories)
    if "weights_backbone" in inspect.signature(get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None
    return get_model(name, **kwargs).state_dict()


@contextlib.contextmanager
def offline_weights() -> Iterator[None]:
    """Inside the block, every torchvision weights download returns a state_dict of the right
    shape instead (see the module docstring); nothing is fetched."""
    original = WeightsEnum.get_state_dict

    def shaped(self: WeightsEnum, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return _shaped_state(self)

    WeightsEnum.get_state_dict = shaped  # type: ignore[method-assign]
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------------- the builds
@dataclass(frozen=True)
class RowModels:
    """What one trial of a row trains, as the preflight built it."""

    label: str
    teacher: str | None  # "retinanet resnet101 fpn256 800x1333 torchvision:... 56.7M" or None
    student: str
    kd: str  # "ssim (w=3.0, adapter)", or "none"
    trainable_params: int  # the one DDP-wrapped module: student, adapters, assistants


def dataset_classes(exp: ExperimentConfig) -> int | None:
    """The dataset's class count as far as it is known without reading images: the categories of
    the val annotation file (when it is given and readable), the synthetic data's classes when no
    dataset is given, else None (the data validation that follows names the problem)."""
    data = exp.data
    if data.root is None and data.val_ann is None:
        return len(CLASSES)
    path = Path(data.val_ann) if data.val_ann else Path(data.root) / "val.json"
    try:
        categories = json.loads(path.read_text()).get("categories")
    except (OSError, ValueError, AttributeError):
        return None
    return len(categories) if isinstance(categories, list) and categories else None


def _model_line(cfg: ModelConfig, model: nn.Module) -> str:
    weights = cfg.weights or "random init"
    if cfg.weights and not cfg.weights.startswith(TORCHVISION_PREFIX):
        weights = Path(cfg.weights).name
    params = sum(p.numel() for p in model.parameters()) / 1e6
    deconv = f" + deconv x{cfg.upsample}" if cfg.upsample > 1 else ""
    return f"{describe(cfg)} fpn{cfg.fpn_channels}{deconv} {cfg.min_size}x{cfg.max_size} {weights} ({params:.1f}M params)"


def _kd_line(exp: ExperimentConfig) -> str:
    if not exp.kd:
        return "none"
    parts = []
    for term in exp.kd:
        extra = [f"w={term.weight:g}"] + ([f"adapter{' auto' if term.adapter == 'auto' else ''}"] if term.adapter else []) + [f"{k}={v}" for k, v in term.params.items()]
        parts.append(f"{term.loss} ({', '.join(extra)})")
    return " + ".join(parts) + (f", teacher at {exp.teacher_scale:g}x" if exp.teacher_scale != 1.0 else "")


@contextlib.contextmanager
def _role(role: str) -> Iterator[None]:
    """Rename ``model.<field>`` in a ConfigError raised inside to ``<role>.<field>``."""
    try:
        yield
    except ConfigError as exc:
        if not str(exc).startswith("model."):
            raise
        raise ConfigError(f"{role}.{str(exc)[len('model.'):]}") from None


def _classes_unknown_config(cfg: ModelConfig) -> ModelConfig:
    """With the class count unknown: check a local checkpoint for everything but the
    class-dependent shapes, then build without it."""
    if cfg.weights is None or cfg.weights.startswith(TORCHVISION_PREFIX) or cfg.num_classes:
        return cfg
    check_checkpoint(cfg)
    return dataclasses.replace(cfg, weights=None)


def preflight(trials: Sequence[tuple[str, ExperimentConfig]], num_classes: int | None, source: str = "") -> list[RowModels]:
    """Build every ``(row label, config)`` trial's models as :func:`~kdsweep.train.model.build_model`
    does, on the meta device with offline weights; return one :class:`RowModels` per trial.

    ``num_classes``: the dataset's class count (:func:`dataset_classes`); None when it cannot be
    known yet (then checkpoints are checked for every shape that does not depend on it).

    Raises:
        ConfigError: ``<source>: row '<label>': <field>: <problem and fix>``.
    """
    classes = num_classes or 2
    teachers: dict[str, dict[str, torch.Tensor]] = {}
    out = []
    with torch.device("meta"), offline_weights(), warnings.catch_warnings():
        # loading a checkpoint (host tensors) into a meta model checks every key and shape, and
        # copies nothing: torch says so once per tensor
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        for label, exp in trials:
            try:
                if num_classes is None:
                    with _role("teacher"):
                        exp = dataclasses.replace(exp, teacher=_classes_unknown_config(exp.teacher))
                    with _role("student"):
                        exp = dataclasses.replace(exp, student=_classes_unknown_config(exp.student))
                teacher_line, state = None, None
                if exp.kd:
                    key = config_hash({"teacher": to_dict(teacher_model(exp)), "classes": classes})
                    if key not in teachers:
                        with _role("teacher"):
                            teachers[key] = build_model(teacher_experiment(exp), classes).student.state_dict()
                    state = teachers[key]
                with _role("student"):
                    distiller = build_model(exp, classes, state)
                if distiller.teacher is not None:
                    teacher_line = _model_line(teacher_model(exp), distiller.teacher)
                trainable = sum(p.numel() for p in distiller.trainable.parameters() if p.requires_grad)
                out.append(RowModels(label, teacher_line, _model_line(student_model(exp), distiller.student), _kd_line(exp), trainable))
            except ConfigError as exc:
                where = f"{source}: " if source else ""
                raise ConfigError(f"{where}row '{label}': {exc}") from None
    return out


def describe_row(row: RowModels) -> str:
    """One line: ``<label>: teacher ... -> student ...; kd: ...``."""
    teacher = f"teacher {row.teacher} -> " if row.teacher else ""
    return f"{row.label}: {teacher}student {row.student}; kd: {row.kd}; {row.trainable_params / 1e6:.1f}M trainable"
